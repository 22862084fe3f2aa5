// The activecall test page: a WebRTC call from this browser to the daemon (protocol.md §5.2).
// Plain JavaScript, no build step, no external resources. Tests drive it through window.acTest.
(function () {
  "use strict";

  var params = new URLSearchParams(window.location.search);
  var token = params.get("token");
  var SILENCE_RMS = 0.01; // about -40 dBFS: below this a 20 ms window counts as silent
  var GATHER_WAIT_MS = 3000; // wait this long for ICE gathering, then trickle the rest
  var HANGUP_WAIT_MS = 5000; // after a hangup command, close the socket ourselves after this
  var MAX_LOG_LINES = 500;

  var $ = function (id) { return document.getElementById(id); };

  var acTest = {
    start: start,
    hangup: hangup,
    tts: sendTts,
    dtmf: sendDtmf,
    send: sendCommand,
    events: [],
    commands: [], // sent on the control socket
    transcript: [],
    // totalMs: remote audio measured; nonSilentMs: of it audible; spanMs: first to last audible window
    agentAudio: { totalMs: 0, nonSilentMs: 0, maxRms: 0, spanMs: 0 },
    state: "idle",
    sessionId: null,
    errors: []
  };
  window.acTest = acTest;

  var call = null; // the current call: {sid, ws, pc, mic, ...}

  // --- HTTP helpers --------------------------------------------------------------------------

  function withToken(path) {
    if (!token) { return path; }
    return path + (path.indexOf("?") >= 0 ? "&" : "?") + "token=" + encodeURIComponent(token);
  }

  function fetchJson(path, init) {
    return fetch(withToken(path), init || {}).then(function (response) {
      return response.text().then(function (text) {
        if (!response.ok) {
          var message = text;
          try { message = JSON.parse(text).error || text; } catch (e) { /* plain text */ }
          throw new Error(path + ": HTTP " + response.status + " " + message);
        }
        return text ? JSON.parse(text) : null;
      });
    });
  }

  function randomSid() {
    var b = new Uint8Array(16);
    window.crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    var h = Array.prototype.map.call(b, function (x) { return (x + 0x100).toString(16).slice(1); }).join("");
    return "s." + h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  function socketUrl(sid) {
    var scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    return withToken(scheme + "//" + window.location.host + "/call/webrtc?id=" + encodeURIComponent(sid));
  }

  // --- page state ----------------------------------------------------------------------------

  function setState(state) {
    acTest.state = state;
    var el = $("state");
    el.textContent = state;
    el.setAttribute("data-state", state);
    var live = state === "active";
    var busy = state === "starting" || state === "connecting" || state === "active" || state === "ending";
    $("start").disabled = busy;
    $("hangup").disabled = !busy || state === "ending";
    $("tts-send").disabled = !live;
    Array.prototype.forEach.call($("keypad").querySelectorAll("button"), function (b) { b.disabled = !live; });
  }

  function logLine(cls, text) {
    var list = $("log");
    var li = document.createElement("li");
    li.className = cls;
    li.textContent = new Date().toISOString().slice(11, 23) + " " + text;
    list.appendChild(li);
    while (list.childNodes.length > MAX_LOG_LINES) { list.removeChild(list.firstChild); }
    list.scrollTop = list.scrollHeight;
  }

  function noteError(message) {
    acTest.errors.push(String(message));
    logLine("err", "! " + message);
  }

  function addTranscript(speaker, text) {
    if (!text) { return; }
    acTest.transcript.push({ speaker: speaker, text: text, at: Date.now() });
    var li = document.createElement("li");
    li.className = speaker === "caller" ? "caller" : "agent";
    var who = document.createElement("span");
    who.className = "who";
    who.textContent = speaker + ":";
    li.appendChild(who);
    li.appendChild(document.createTextNode(text));
    var list = $("transcript");
    list.appendChild(li);
    list.scrollTop = list.scrollHeight;
  }

  // --- playbooks and records -----------------------------------------------------------------

  function loadPlaybooks() {
    return fetchJson("/api/playbooks").then(function (list) {
      var select = $("playbook");
      var wanted = select.value || params.get("playbook") || "";
      while (select.options.length > 1) { select.remove(1); }
      (list || []).forEach(function (p) {
        var option = document.createElement("option");
        option.value = p.name;
        option.textContent = p.name + (p.updated ? "  (" + p.updated.slice(0, 19).replace("T", " ") + ")" : "");
        select.appendChild(option);
      });
      select.value = wanted;
      if (select.value !== wanted) { select.value = ""; }
      return list;
    }).catch(function (e) { noteError(e.message); return []; });
  }

  function loadRecords() {
    return fetchJson("/api/records").then(function (list) {
      var body = $("records");
      while (body.firstChild) { body.removeChild(body.firstChild); }
      (list || []).forEach(function (r) {
        var tr = document.createElement("tr");
        [r.id, (r.date || "").replace("T", " "), r.duration, r.status].forEach(function (v) {
          var td = document.createElement("td");
          td.textContent = v === undefined || v === null ? "" : String(v);
          tr.appendChild(td);
        });
        body.appendChild(tr);
      });
      return list;
    }).catch(function (e) { noteError(e.message); return []; });
  }

  // --- agent audio meter ---------------------------------------------------------------------

  function startMeter(stream) {
    stopMeter();
    var audio = $("remote-audio");
    // Chrome feeds a remote WebRTC stream to WebAudio only while a media element plays it too.
    audio.srcObject = stream;
    var playing = audio.play();
    if (playing && playing.catch) { playing.catch(function (e) { noteError("audio playback: " + e.message); }); }
    var Context = window.AudioContext || window.webkitAudioContext;
    var ctx = new Context();
    if (ctx.state === "suspended" && ctx.resume) { ctx.resume(); }
    var source = ctx.createMediaStreamSource(stream);
    var analyser = ctx.createAnalyser();
    analyser.fftSize = 1024;
    source.connect(analyser);
    var data = new Float32Array(analyser.fftSize);
    var last = performance.now();
    var stats = acTest.agentAudio;
    var firstHeard = null;
    var timer = setInterval(function () {
      var now = performance.now();
      var dt = Math.min(now - last, 100); // a throttled timer must not count a long gap as audio
      last = now;
      analyser.getFloatTimeDomainData(data);
      var sum = 0;
      for (var i = 0; i < data.length; i++) { sum += data[i] * data[i]; }
      var rms = Math.sqrt(sum / data.length);
      stats.totalMs += dt;
      if (rms >= SILENCE_RMS) {
        stats.nonSilentMs += dt;
        if (firstHeard === null) { firstHeard = stats.totalMs - dt; }
        stats.spanMs = stats.totalMs - firstHeard; // first to last audible window
      }
      if (rms > stats.maxRms) { stats.maxRms = rms; }
      $("level").style.width = Math.min(100, Math.round(rms * 300)) + "%";
    }, 20);
    var shown = setInterval(function () {
      $("audio-stats").textContent = "agent audio: " + Math.round(stats.nonSilentMs) + " ms heard of " +
        Math.round(stats.totalMs) + " ms, peak rms " + stats.maxRms.toFixed(3);
    }, 250);
    meter = { ctx: ctx, source: source, timers: [timer, shown] };
  }

  var meter = null;

  function stopMeter() {
    if (!meter) { return; }
    meter.timers.forEach(clearInterval);
    try { meter.source.disconnect(); } catch (e) { /* already */ }
    meter.ctx.close();
    meter = null;
    $("level").style.width = "0";
  }

  // --- the call ------------------------------------------------------------------------------

  function parseOption() {
    var text = $("option").value.trim();
    if (!text) { return {}; }
    var option = JSON.parse(text);
    if (option === null || typeof option !== "object" || Array.isArray(option)) {
      throw new Error("the call option must be a JSON object");
    }
    return option;
  }

  function iceServersFrom(list) {
    return (list || []).map(function (s) {
      var server = { urls: s.urls };
      if (s.username !== null && s.username !== undefined) { server.username = s.username; }
      if (s.credential !== null && s.credential !== undefined) { server.credential = s.credential; }
      return server;
    });
  }

  function waitGathering(pc, timeoutMs) {
    return new Promise(function (resolve) {
      if (pc.iceGatheringState === "complete") { resolve(true); return; }
      var timer = setTimeout(function () { done(false); }, timeoutMs);
      function check() { if (pc.iceGatheringState === "complete") { done(true); } }
      function done(complete) {
        clearTimeout(timer);
        pc.removeEventListener("icegatheringstatechange", check);
        resolve(complete);
      }
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  function sendCommand(command) {
    if (!call || !call.ws || call.ws.readyState !== WebSocket.OPEN) {
      throw new Error("no call: cannot send " + command.command);
    }
    var text = JSON.stringify(command);
    call.ws.send(text);
    acTest.commands.push(command);
    logLine("out", "> " + (command.command === "invite" ? text.replace(/"offer":"[^"]*"/, '"offer":"…"') : text));
  }

  // start(opts) -> Promise resolving (with the session id) once the answer is applied.
  // opts: {playbook: "name.md" | undefined, option: {...} | undefined, id: "sid" | undefined,
  //        trickle: true to send the offer at once and trickle the candidates (addIceCandidate)}
  function start(opts) {
    opts = opts || {};
    if (call) { return Promise.reject(new Error("a call is already running")); }
    var option;
    try {
      option = opts.option !== undefined ? opts.option : parseOption();
    } catch (e) {
      noteError(e.message);
      return Promise.reject(e);
    }
    var playbook = opts.playbook !== undefined ? opts.playbook : $("playbook").value;
    acTest.events.length = 0;
    acTest.commands.length = 0;
    acTest.transcript.length = 0;
    acTest.agentAudio.totalMs = 0;
    acTest.agentAudio.nonSilentMs = 0;
    acTest.agentAudio.maxRms = 0;
    acTest.agentAudio.spanMs = 0;
    while ($("transcript").firstChild) { $("transcript").removeChild($("transcript").firstChild); }
    var current = { sid: null, ws: null, pc: null, mic: null, trickle: false, offerSdp: null, queued: [],
                    ended: null };
    call = current;
    setState("starting");

    var answerPromise = new Promise(function (resolve, reject) {
      current.resolveAnswer = function () {
        if (!current.settled) { current.settled = true; resolve(current.sid); }
      };
      current.failSetup = function (error) {
        if (!current.settled) { current.settled = true; reject(error); }
      };
    });
    current.ended = new Promise(function (resolve) { current.endedResolve = resolve; });

    var iceServers = [];
    var setup = fetchJson("/iceservers").then(function (list) {
      iceServers = iceServersFrom(list);
      return navigator.mediaDevices.getUserMedia({ audio: true, video: false });
    }).then(function (mic) {
      current.mic = mic;
      if (call !== current) { throw new Error("call ended during setup"); }
      var pc = new RTCPeerConnection({ iceServers: iceServers });
      current.pc = pc;
      mic.getAudioTracks().forEach(function (track) { current.sender = pc.addTrack(track, mic); });
      pc.ontrack = function (event) {
        var stream = event.streams && event.streams[0] ? event.streams[0] : new MediaStream([event.track]);
        logLine("in", "remote audio track " + event.track.id);
        startMeter(stream);
      };
      // Candidates found after the offer's SDP was taken are trickled: queued until invite is sent.
      pc.onicecandidate = function (event) {
        if (current.offerSdp === null || !event.candidate || !event.candidate.candidate) { return; }
        var command = { command: "addIceCandidate", candidate: event.candidate.candidate,
                        sdpMid: event.candidate.sdpMid || "0", sdpMLineIndex: event.candidate.sdpMLineIndex || 0 };
        if (current.trickle) { sendIfOpen(command); } else { current.queued.push(command); }
      };
      pc.onconnectionstatechange = function () {
        logLine("in", "peer connection " + pc.connectionState);
        if (pc.connectionState === "failed") { noteError("WebRTC peer connection failed"); }
      };
      return pc.createOffer().then(function (offer) { return pc.setLocalDescription(offer); })
        .then(function () { return opts.trickle ? false : waitGathering(pc, GATHER_WAIT_MS); });
    }).then(function (complete) {
      if (call !== current) { throw new Error("call ended during setup"); }
      current.offerSdp = current.pc.localDescription.sdp;
      if (!complete) { logLine("in", "ICE gathering still running: trickling the rest"); }
      if (playbook) {
        return fetchJson("/api/playbook/run", {
          method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ playbook: playbook })
        }).then(function (r) { return { complete: complete, sid: r.session_id }; });
      }
      return { complete: complete, sid: opts.id || randomSid() };
    }).then(function (r) {
      if (call !== current) { throw new Error("call ended during setup"); }
      current.sid = r.sid;
      acTest.sessionId = r.sid;
      $("sid").textContent = r.sid + (playbook ? "  (playbook " + playbook + ")" : "");
      setState("connecting");
      return openSocket(current, option);
    });

    setup.catch(function (e) {
      noteError(e && e.message ? e.message : String(e));
      current.failSetup(e);
      finish(current, "failed");
    });
    return answerPromise;
  }

  function sendIfOpen(command) {
    try { sendCommand(command); } catch (e) { noteError(e.message); }
  }

  function openSocket(current, option) {
    return new Promise(function (resolve, reject) {
      var ws = new WebSocket(socketUrl(current.sid));
      current.ws = ws;
      ws.onopen = function () {
        var invite = { command: "invite", option: Object.assign({}, option, { offer: current.offerSdp }) };
        sendCommand(invite);
        current.trickle = true;
        current.queued.splice(0).forEach(sendIfOpen);
        resolve();
      };
      ws.onerror = function () { noteError("WebSocket error"); };
      ws.onclose = function (event) {
        logLine("in", "socket closed (" + event.code + ")");
        current.failSetup(new Error("socket closed before the answer (" + event.code + ")"));
        if (!current.opened) { reject(new Error("WebSocket closed (" + event.code + ")")); }
        finish(current, current.answeredOk ? "ended" : "failed");
      };
      ws.onmessage = function (message) {
        if (typeof message.data !== "string") { return; } // subscribe audio frames
        var event;
        try { event = JSON.parse(message.data); } catch (e) { noteError("bad event: " + message.data); return; }
        acTest.events.push(event);
        logLine(event.event === "error" ? "err" : "in", "< " + message.data);
        onEvent(current, event);
      };
      ws.addEventListener("open", function () { current.opened = true; });
    });
  }

  function onEvent(current, event) {
    switch (event.event) {
      case "answer":
        if (current.settled || event.trackId !== current.sid) { return; }
        current.pc.setRemoteDescription({ type: "answer", sdp: event.sdp }).then(function () {
          current.answeredOk = true;
          if (call === current) { setState("active"); }
          current.resolveAnswer();
        }, function (e) {
          noteError("cannot apply the answer: " + e.message);
          current.failSetup(e);
          hangup();
        });
        break;
      case "error":
        acTest.errors.push((event.sender || "") + ": " + (event.error || ""));
        if (!current.settled && (event.sender === "invite" || event.sender === "playbook")) {
          current.failSetup(new Error("invite failed: " + event.error));
        }
        break;
      case "asrFinal":
        addTranscript("caller", event.text);
        break;
      case "metrics":
        // The text of each play the daemon speaks itself (playbook greeting, LLM replies).
        if (event.key === "tts_play_id_map" && event.data && event.data.text &&
            !(current.ownPlays && current.ownPlays[event.data.playId])) {
          addTranscript("agent", event.data.text);
        }
        break;
      case "addHistory":
        addTranscript(event.speaker || "agent", event.text);
        break;
      case "hangup":
        if (call === current) { setState("ending"); }
        break;
      default:
        break;
    }
  }

  function finish(current, state) {
    if (current.finished) { return; }
    current.finished = true;
    current.trickle = false;
    if (current.hangupTimer) { clearTimeout(current.hangupTimer); }
    stopMeter();
    if (current.pc) { try { current.pc.close(); } catch (e) { /* closed */ } }
    if (current.mic) { current.mic.getTracks().forEach(function (t) { t.stop(); }); }
    if (current.ws && current.ws.readyState <= WebSocket.OPEN) { current.ws.close(); }
    $("remote-audio").srcObject = null;
    if (call === current) { call = null; setState(state); }
    current.endedResolve(state);
    setTimeout(loadRecords, 500);
  }

  // hangup() -> Promise resolving when the call is over (the daemon closed the socket).
  function hangup() {
    var current = call;
    if (!current) { return Promise.resolve(acTest.state); }
    if (current.ws && current.ws.readyState === WebSocket.OPEN) {
      setState("ending");
      sendIfOpen({ command: "hangup" });
      current.hangupTimer = setTimeout(function () { finish(current, "ended"); }, HANGUP_WAIT_MS);
    } else {
      current.failSetup(new Error("hung up"));
      finish(current, "ended");
    }
    return current.ended;
  }

  var ttsCount = 0;

  // tts(text) -> the playId: one complete play (endOfStream), so it ends with trackEnd once spoken.
  function sendTts(text) {
    ttsCount += 1;
    var playId = "page-" + ttsCount;
    if (call) { call.ownPlays = call.ownPlays || {}; call.ownPlays[playId] = true; }
    sendCommand({ command: "tts", text: text, playId: playId, endOfStream: true });
    addTranscript("agent", text);
    return playId;
  }

  function sendDtmf(digits) {
    if (!call || !call.sender || !call.sender.dtmf) { throw new Error("no DTMF sender on this call"); }
    if (!call.sender.dtmf.canInsertDTMF) { throw new Error("the answer negotiated no telephone-event"); }
    call.sender.dtmf.insertDTMF(digits, 100, 70);
    logLine("out", "> DTMF " + digits);
  }

  // rtpStats() -> Promise of the audio RTP counters of the current call (diagnostics).
  function rtpStats() {
    if (!call || !call.pc) { return Promise.resolve(null); }
    return call.pc.getStats().then(function (report) {
      var out = { connectionState: call.pc.connectionState, iceConnectionState: call.pc.iceConnectionState };
      report.forEach(function (s) {
        if (s.type === "inbound-rtp" && s.kind === "audio") {
          out.inbound = { packetsReceived: s.packetsReceived, bytesReceived: s.bytesReceived,
                          packetsLost: s.packetsLost, audioLevel: s.audioLevel, totalAudioEnergy: s.totalAudioEnergy,
                          totalSamplesDuration: s.totalSamplesDuration, concealedSamples: s.concealedSamples };
        } else if (s.type === "outbound-rtp" && s.kind === "audio") {
          out.outbound = { packetsSent: s.packetsSent, bytesSent: s.bytesSent };
        }
      });
      return out;
    });
  }
  acTest.rtpStats = rtpStats;

  // --- wiring --------------------------------------------------------------------------------

  $("start").addEventListener("click", function () {
    start().catch(function () { /* shown in the log */ });
  });
  $("hangup").addEventListener("click", function () { hangup(); });
  $("tts-form").addEventListener("submit", function (event) {
    event.preventDefault();
    var text = $("tts-text").value.trim();
    if (text) { try { sendTts(text); } catch (e) { noteError(e.message); } }
  });
  Array.prototype.forEach.call($("keypad").querySelectorAll("button"), function (b) {
    b.addEventListener("click", function () { try { sendDtmf(b.textContent); } catch (e) { noteError(e.message); } });
  });
  $("reload-playbooks").addEventListener("click", loadPlaybooks);
  $("reload-records").addEventListener("click", loadRecords);
  $("clear-log").addEventListener("click", function () {
    var list = $("log");
    while (list.firstChild) { list.removeChild(list.firstChild); }
  });

  setState("idle");
  acTest.ready = Promise.all([loadPlaybooks(), loadRecords()]).then(function () {
    if (params.get("autostart") === "1") {
      start().catch(function () { /* shown in the log */ });
    }
    return true;
  });
})();
