"""Tests for activecall.control.commands and activecall.options (protocol.md §2, §4)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from activecall.control.commands import (
    COMMAND_TYPES,
    AcceptCommand,
    AddIceCandidateCommand,
    BridgeCommand,
    Command,
    CommandError,
    CustomCommand,
    HangupCommand,
    HistoryCommand,
    InterruptCommand,
    InviteCommand,
    MessageCommand,
    MuteCommand,
    PauseCommand,
    PlayCommand,
    ReferCommand,
    RejectCommand,
    ResumeCommand,
    RingingCommand,
    StartCommand,
    TtsCommand,
    UnbridgeCommand,
    UnmuteCommand,
    command_from_object,
    decode_command,
    encode_command,
)
from activecall.options import (
    AgcOption,
    AmbianceOption,
    CallOption,
    EouOption,
    MediaPassOption,
    RealtimeOption,
    RecorderOption,
    ReferOption,
    RingbackDetectionOption,
    SipOption,
    SynthesisOption,
    TranscriptionOption,
    VadOption,
)

# (wire text, expected command): every command of §2.2, spec examples first.
VALID: list[tuple[str, Command]] = [
    (
        '{"command":"invite","option":{"callee":"sip:1001@pbx.example.com","caller":"sip:agent@10.0.0.9",'
        '"asr":{"provider":"tencent","language":"zh-CN"},"vad":{"type":"silero"},'
        '"tts":{"provider":"aliyun","speaker":"longxiaochun"}}}',
        InviteCommand(
            option=CallOption(
                callee="sip:1001@pbx.example.com",
                caller="sip:agent@10.0.0.9",
                asr=TranscriptionOption(provider="tencent", language="zh-CN"),
                vad=VadOption(type="silero"),
                tts=SynthesisOption(provider="aliyun", speaker="longxiaochun"),
            )
        ),
    ),
    (
        '{"command":"start","option":{"codec":"pcm","sampleRate":8000}}',
        StartCommand(option=CallOption(codec="pcm", sample_rate=8000)),
    ),
    ('{"command":"accept","option":{}}', AcceptCommand(option=CallOption())),
    ('{"command":"reject","reason":"Busy","code":486}', RejectCommand(reason="Busy", code=486)),
    ('{"command":"reject","reason":"no"}', RejectCommand(reason="no", code=603)),
    ('{"command":"ringing"}', RingingCommand()),
    (
        '{"command":"ringing","ringtone":"http://x/ring.wav","earlyMedia":true,'
        '"recorder":{"recorderFile":"{id}.wav","format":"pcmu"}}',
        RingingCommand(
            recorder=RecorderOption(recorder_file="{id}.wav", format="pcmu"),
            early_media=True,
            ringtone="http://x/ring.wav",
        ),
    ),
    (
        '{"command":"tts","text":"Hello, how can I help?","playId":"turn-1","endOfStream":true}',
        TtsCommand(text="Hello, how can I help?", play_id="turn-1", end_of_stream=True),
    ),
    (
        '{"command":"tts","text":"hi","speaker":"s","autoHangup":true,"streaming":true,'
        '"option":{"provider":"deepgram","speed":1.2},"waitInputTimeout":5000,"base64":false,'
        '"cacheKey":"k1"}',
        TtsCommand(
            text="hi",
            speaker="s",
            auto_hangup=True,
            streaming=True,
            option=SynthesisOption(provider="deepgram", speed=1.2),
            wait_input_timeout=5000,
            cache_key="k1",
        ),
    ),
    ('{"command":"play","url":"http://x/a.wav"}', PlayCommand(url="http://x/a.wav")),
    (
        '{"command":"play","url":"/tmp/a.wav","playId":"p","autoHangup":true,'
        '"waitInputTimeout":0,"offsetMs":1500}',
        PlayCommand(
            url="/tmp/a.wav", play_id="p", auto_hangup=True, wait_input_timeout=0, offset_ms=1500
        ),
    ),
    ('{"command":"interrupt","graceful":true}', InterruptCommand(graceful=True)),
    ('{"command":"interrupt","fadeOutMs":200}', InterruptCommand(fade_out_ms=200)),
    ('{"command":"pause"}', PauseCommand()),
    ('{"command":"resume"}', ResumeCommand()),
    (
        '{"command":"hangup","reason":"caller","headers":{"X-Result":"done"}}',
        HangupCommand(reason="caller", headers={"X-Result": "done"}),
    ),
    (
        '{"command":"hangup","initiator":"system","refer":true}',
        HangupCommand(initiator="system", refer=True),
    ),
    (
        '{"command":"refer","caller":"sip:agent@pbx","callee":"sip:human@pbx",'
        '"options":{"moh":"http://x/hold.wav","timeout":30}}',
        ReferCommand(
            caller="sip:agent@pbx",
            callee="sip:human@pbx",
            options=ReferOption(moh="http://x/hold.wav", timeout=30),
        ),
    ),
    (
        '{"command":"refer","caller":"","callee":"sip:h@pbx","options":{"autoHangup":false,'
        '"sip":{"username":"u","hangup_headers":{"X":"1"}},"asr":{"provider":"aliyun"},'
        '"callId":"c1","pauseParentAsr":true,"forwardDtmf":false,"denoise":true,"agc":{}}}',
        ReferCommand(
            caller="",
            callee="sip:h@pbx",
            options=ReferOption(
                auto_hangup=False,
                sip=SipOption(username="u", hangup_headers={"X": "1"}),
                asr=TranscriptionOption(provider="aliyun"),
                call_id="c1",
                pause_parent_asr=True,
                forward_dtmf=False,
                denoise=True,
                agc=AgcOption(),
            ),
        ),
    ),
    (
        '{"command":"message","body":"customer_id=12345","headers":{"X-Meta-Source":"agent"}}',
        MessageCommand(body="customer_id=12345", headers={"X-Meta-Source": "agent"}),
    ),
    (
        '{"command":"message","body":"{}","contentType":"application/json","refer":true}',
        MessageCommand(body="{}", content_type="application/json", refer=True),
    ),
    ('{"command":"bridge","targetSessionId":"s.b"}', BridgeCommand(target_session_id="s.b")),
    ('{"command":"unbridge","targetSessionId":"s.b"}', UnbridgeCommand(target_session_id="s.b")),
    (
        '{"command":"addIceCandidate","candidate":"candidate:842163049 1 udp 1677729535 '
        '10.0.0.1 54321 typ host","sdpMid":"0"}',
        AddIceCandidateCommand(
            candidate="candidate:842163049 1 udp 1677729535 10.0.0.1 54321 typ host",
            sdp_mid="0",
        ),
    ),
    ('{"command":"mute","trackId":"s.1"}', MuteCommand(track_id="s.1")),
    ('{"command":"mute"}', MuteCommand()),
    ('{"command":"unmute","trackId":"server-side-track"}', UnmuteCommand(track_id="server-side-track")),
    ('{"command":"history","speaker":"user","text":"hi"}', HistoryCommand(speaker="user", text="hi")),
    ('{"command":"custom","sender":"app","data":{"k":[1,2]}}', CustomCommand(sender="app", data={"k": [1, 2]})),
    ('{"command":"custom"}', CustomCommand()),
]

# (wire text, exact error message)
BAD: list[tuple[str | bytes, str]] = [
    ("nope", "invalid JSON: Expecting value: line 1 column 1 (char 0)"),
    ('{"command":"custom","data":NaN}', "invalid JSON: NaN is not valid JSON"),
    ("[]", "invalid command: expected an object"),
    ('"tts"', "invalid command: expected an object"),
    ("{}", "missing field command"),
    ('{"command":null}', "missing field command"),
    ('{"command":5}', "invalid command: expected a string"),
    ('{"command":"sendDtmf","digit":"1"}', "unknown command: sendDtmf"),
    ('{"command":"Invite","option":{}}', "unknown command: Invite"),
    ('{"command":"invite"}', "missing field invite.option"),
    ('{"command":"start"}', "missing field start.option"),
    ('{"command":"accept"}', "missing field accept.option"),
    ('{"command":"reject"}', "missing field reject.reason"),
    ('{"command":"tts"}', "missing field tts.text"),
    ('{"command":"tts","text":null}', "missing field tts.text"),
    ('{"command":"play"}', "missing field play.url"),
    ('{"command":"refer","caller":""}', "missing field refer.callee"),
    ('{"command":"refer","callee":"sip:x@y"}', "missing field refer.caller"),
    ('{"command":"message"}', "missing field message.body"),
    ('{"command":"bridge"}', "missing field bridge.targetSessionId"),
    ('{"command":"unbridge"}', "missing field unbridge.targetSessionId"),
    ('{"command":"addIceCandidate"}', "missing field addIceCandidate.candidate"),
    ('{"command":"history","speaker":"u"}', "missing field history.text"),
    ('{"command":"invite","option":"x"}', "invalid invite.option: expected an object"),
    # string for bool
    ('{"command":"interrupt","graceful":"false"}', "invalid interrupt.graceful: expected a boolean"),
    ('{"command":"tts","text":"x","autoHangup":1}', "invalid tts.autoHangup: expected a boolean"),
    # float / bool / string for integers
    (
        '{"command":"tts","text":"x","waitInputTimeout":250.5}',
        "invalid tts.waitInputTimeout: expected an integer from 0 to 4294967295",
    ),
    (
        '{"command":"play","url":"u","offsetMs":250.0}',
        "invalid play.offsetMs: expected an integer from 0 to 4294967295",
    ),
    (
        '{"command":"reject","reason":"r","code":"486"}',
        "invalid reject.code: expected an integer from 0 to 4294967295",
    ),
    (
        '{"command":"reject","reason":"r","code":true}',
        "invalid reject.code: expected an integer from 0 to 4294967295",
    ),
    # negative and out-of-range unsigned
    (
        '{"command":"reject","reason":"r","code":-1}',
        "invalid reject.code: expected an integer from 0 to 4294967295",
    ),
    (
        '{"command":"interrupt","fadeOutMs":4294967296}',
        "invalid interrupt.fadeOutMs: expected an integer from 0 to 4294967295",
    ),
    (
        '{"command":"invite","option":{"inactivityTimeout":-5}}',
        "invalid invite.option.inactivityTimeout: expected a non-negative integer",
    ),
    (
        '{"command":"addIceCandidate","candidate":"c","sdpMLineIndex":"0"}',
        "invalid addIceCandidate.sdpMLineIndex: expected an integer from 0 to 4294967295",
    ),
    # string fields
    ('{"command":"tts","text":5}', "invalid tts.text: expected a string"),
    ('{"command":"mute","trackId":["a"]}', "invalid mute.trackId: expected a string"),
    # string -> string maps
    ('{"command":"hangup","headers":{"X-A":1}}', "invalid hangup.headers.X-A: expected a string"),
    ('{"command":"hangup","headers":"X-A: 1"}', "invalid hangup.headers: expected an object of strings"),
    (
        '{"command":"invite","option":{"extra":{"k":null}}}',
        "invalid invite.option.extra.k: expected a string",
    ),
    (
        '{"command":"refer","caller":"","callee":"sip:a@b","options":{"sip":{"headers":{"X":true}}}}',
        "invalid refer.options.sip.headers.X: expected a string",
    ),
    # nested option errors, dotted paths
    ('{"command":"tts","text":"x","option":{"speed":"fast"}}', "invalid tts.option.speed: expected a number"),
    (
        '{"command":"tts","text":"x","option":{"volume":5.5}}',
        "invalid tts.option.volume: expected an integer from -2147483648 to 2147483647",
    ),
    ('{"command":"invite","option":{"vad":{"ratio":"0.5"}}}', "invalid invite.option.vad.ratio: expected a number"),
    ('{"command":"invite","option":{"vad":[]}}', "invalid invite.option.vad: expected an object"),
    ('{"command":"invite","option":{"interruption":{"strategy":"sometimes"}}}',
     "invalid invite.option.interruption.strategy: expected one of both, vad, asr, none"),
    ('{"command":"invite","option":{"interruption":{"ignoreFirstMs":-1}}}',
     "invalid invite.option.interruption.ignoreFirstMs: expected an integer from 0 to 4294967295"),
    ('{"command":"invite","option":{"eou":{"timeout":"soon"}}}',
     "invalid invite.option.eou.timeout: expected an integer from 0 to 4294967295"),
    ('{"command":"invite","option":{"asr":{"language":"en"}}}', "missing field invite.option.asr.provider"),
    (
        '{"command":"invite","option":{"sip":{"enable_srtp":"yes"}}}',
        "invalid invite.option.sip.enable_srtp: expected a boolean",
    ),
    (
        '{"command":"invite","option":{"sip":{"extract_headers":["X-A",1]}}}',
        "invalid invite.option.sip.extract_headers: expected an array of strings",
    ),
    (
        '{"command":"invite","option":{"realtime":{"tools":{}}}}',
        "invalid invite.option.realtime.tools: expected an array",
    ),
    (
        '{"command":"refer","caller":"","callee":"sip:a@b","options":{"timeout":"30"}}',
        "invalid refer.options.timeout: expected an integer from 0 to 4294967295",
    ),
    (
        '{"command":"invite","option":{"agc":{"adjacentSpeechFramesThreshold":1.5}}}',
        "invalid invite.option.agc.adjacentSpeechFramesThreshold: expected an integer from 1 to 1000",
    ),
    (
        '{"command":"invite","option":{"agc":{"maxGainDb":1e6}}}',
        "invalid invite.option.agc.maxGainDb: expected a number from 0 to 90",
    ),
    (
        '{"command":"invite","option":{"agc":{"maxGainChangeDbPerSecond":0}}}',
        "invalid invite.option.agc.maxGainChangeDbPerSecond: expected a number from 0.1 to 1000",
    ),
    (
        '{"command":"invite","option":{"ringbackDetection":{"enabled":"true"}}}',
        "invalid invite.option.ringbackDetection.enabled: expected a boolean",
    ),
    (
        '{"command":"invite","option":{"ambiance":{"duckLevel":"low"}}}',
        "invalid invite.option.ambiance.duckLevel: expected a number",
    ),
    (
        '{"command":"invite","option":{"eou":{"timeout":-1}}}',
        "invalid invite.option.eou.timeout: expected an integer from 0 to 4294967295",
    ),
    # recorder.format limited to its list (case-sensitive)
    (
        '{"command":"invite","option":{"recorder":{"format":"mp3"}}}',
        "invalid invite.option.recorder.format: expected one of wav, pcm, pcmu, pcma, g722",
    ),
    (
        '{"command":"ringing","recorder":{"format":"WAV"}}',
        "invalid ringing.recorder.format: expected one of wav, pcm, pcmu, pcma, g722",
    ),
    # option.sampleRate 8000-48000
    (
        '{"command":"invite","option":{"sampleRate":7999}}',
        "invalid invite.option.sampleRate: expected an integer from 8000 to 48000",
    ),
    (
        '{"command":"start","option":{"sampleRate":48001}}',
        "invalid start.option.sampleRate: expected an integer from 8000 to 48000",
    ),
    (
        '{"command":"invite","option":{"sampleRate":"16000"}}',
        "invalid invite.option.sampleRate: expected an integer from 8000 to 48000",
    ),
    # MediaPass required keys
    (
        '{"command":"invite","option":{"mediaPass":{"inputSampleRate":16000,"outputSampleRate":16000}}}',
        "missing field invite.option.mediaPass.url",
    ),
    (
        '{"command":"accept","option":{"mediaPass":{"url":"ws://x","inputSampleRate":16000}}}',
        "missing field accept.option.mediaPass.outputSampleRate",
    ),
    (
        '{"command":"invite","option":{"mediaPass":{"url":"ws://x","outputSampleRate":8000}}}',
        "missing field invite.option.mediaPass.inputSampleRate",
    ),
]


class DecodeValidTests(SynchronousTestCase):
    """Decoding of well-formed commands."""

    def test_every_command_of_the_table(self) -> None:
        """Each spec example and realistic command decodes to the expected dataclass."""
        for text, expected in VALID:
            self.assertEqual(decode_command(text), expected, text)

    def test_table_covers_every_command(self) -> None:
        """The valid-input table exercises all twenty commands of §2.2 (plus start)."""
        self.assertEqual({cmd.name for _, cmd in VALID}, set(COMMAND_TYPES))
        self.assertEqual(len(COMMAND_TYPES), 20)

    def test_class_names_match_wire_names(self) -> None:
        """Each command class is the PascalCase wire name plus ``Command``."""
        for name, cls in COMMAND_TYPES.items():
            self.assertEqual(cls.__name__, name[0].upper() + name[1:] + "Command")

    def test_bytes_input(self) -> None:
        """A UTF-8 bytes frame decodes like the same text."""
        self.assertEqual(
            decode_command('{"command":"history","speaker":"u","text":"héllo"}'.encode()),
            HistoryCommand(speaker="u", text="héllo"),
        )

    def test_from_object(self) -> None:
        """command_from_object accepts an already-parsed JSON object."""
        self.assertEqual(
            command_from_object({"command": "bridge", "targetSessionId": "x"}),
            BridgeCommand(target_session_id="x"),
        )

    def test_start_is_distinct_alias_of_invite(self) -> None:
        """``start`` decodes to StartCommand, an InviteCommand that is not equal to invite."""
        start = decode_command('{"command":"start","option":{}}')
        invite = decode_command('{"command":"invite","option":{}}')
        self.assertIsInstance(start, StartCommand)
        self.assertIsInstance(start, InviteCommand)
        self.assertNotEqual(start, invite)

    def test_unknown_keys_ignored(self) -> None:
        """Unknown keys at every level are ignored, including camelCase keys inside ``sip``."""
        cmd = decode_command(
            '{"command":"invite","foo":1,"option":{"bar":[1],"tts":{"provider":"p","cacheKey":"k"},'
            '"sip":{"hangupHeaders":{"X":"1"},"username":"u"}}}'
        )
        assert isinstance(cmd, InviteCommand)
        self.assertEqual(cmd.option.tts, SynthesisOption(provider="p"))
        self.assertEqual(cmd.option.sip, SipOption(username="u"))

    def test_null_means_absent(self) -> None:
        """A declared optional key with ``null`` takes its default."""
        self.assertEqual(
            decode_command('{"command":"tts","text":"x","playId":null,"autoHangup":null}'),
            TtsCommand(text="x"),
        )

    def test_custom_data_keeps_any_json(self) -> None:
        """``custom.data`` accepts any JSON value, including scalars and explicit null."""
        for raw, value in [("3", 3), ('"s"', "s"), ("null", None), ("[true]", [True])]:
            cmd = decode_command('{"command":"custom","data":%s}' % raw)
            self.assertEqual(cmd, CustomCommand(data=value))

    def test_u32_bounds(self) -> None:
        """u32 fields accept 0 and 4294967295."""
        self.assertEqual(decode_command('{"command":"reject","reason":"r","code":0}'), RejectCommand("r", 0))
        self.assertEqual(
            decode_command('{"command":"reject","reason":"r","code":4294967295}'),
            RejectCommand("r", 4294967295),
        )

    def test_sample_rate_bounds(self) -> None:
        """``option.sampleRate`` accepts 8000 and 48000 and defaults to 16000."""
        for rate in (8000, 48000):
            cmd = decode_command('{"command":"invite","option":{"sampleRate":%d}}' % rate)
            assert isinstance(cmd, InviteCommand)
            self.assertEqual(cmd.option.sample_rate, rate)
        self.assertEqual(CallOption().sample_rate, 16000)
        self.assertEqual(CallOption().codec, "pcm")

    def test_number_accepts_integer(self) -> None:
        """f32 fields accept JSON integers and store floats."""
        cmd = decode_command('{"command":"tts","text":"x","option":{"speed":2}}')
        assert isinstance(cmd, TtsCommand) and cmd.option is not None
        self.assertEqual(cmd.option.speed, 2.0)
        self.assertIsInstance(cmd.option.speed, float)

    def test_full_call_option(self) -> None:
        """Every CallOption key decodes into its snake_case attribute."""
        obj = {
            "caller": "sip:a@b",
            "callee": "sip:c@d",
            "offer": "v=0",
            "codec": "PCMU",
            "sampleRate": 8000,
            "playbook": "demo",
            "denoise": True,
            "vad": {"type": "nop", "speechPadding": 300, "silenceTimeout": 5000, "voiceThreshold": 0.6},
            "agc": {"maxGainDb": 30},
            "asr": {"provider": "deepgram", "extra": {"model": "nova-2"}, "startWhenAnswer": True},
            "tts": {"provider": "aliyun", "maxConcurrentTasks": 2},
            "recorder": {"recorderFile": "", "samplerate": 8000, "ptime": 0, "format": "wav"},
            "mediaPass": {"url": "ws://m", "inputSampleRate": 16000, "outputSampleRate": 8000, "ptime": 20},
            "eou": {"type": "t", "timeout": 100},
            "realtime": {"provider": "openai", "turnDetection": {"type": "server_vad"}, "tools": [{"a": 1}]},
            "ambiance": {"path": "/a.wav", "enabled": False},
            "ringbackDetection": {"enabled": True, "slidingWindowSize": 4},
            "handshakeTimeout": 10,
            "enableIpv6": True,
            "enableIceLite": False,
            "inactivityTimeout": 50,
            "subscribe": True,
            "sip": {"username": "u", "password": "p", "realm": "r", "contact": "sip:c@h",
                    "headers": {"X-A": "1"}, "extract_headers": ["X-B"], "enable_srtp": True},
            "extra": {"k": "v"},
        }
        opt = CallOption.from_json(obj, "invite.option")
        self.assertEqual(
            opt,
            CallOption(
                caller="sip:a@b",
                callee="sip:c@d",
                offer="v=0",
                codec="PCMU",
                sample_rate=8000,
                playbook="demo",
                denoise=True,
                vad=VadOption(type="nop", speech_padding=300, silence_timeout=5000, voice_threshold=0.6),
                agc=AgcOption(max_gain_db=30.0),
                asr=TranscriptionOption(provider="deepgram", extra={"model": "nova-2"}, start_when_answer=True),
                tts=SynthesisOption(provider="aliyun", max_concurrent_tasks=2),
                recorder=RecorderOption(recorder_file="", samplerate=8000, ptime=0, format="wav"),
                media_pass=MediaPassOption(url="ws://m", input_sample_rate=16000, output_sample_rate=8000, ptime=20),
                eou=EouOption(type="t", timeout=100),
                realtime=RealtimeOption(provider="openai", turn_detection={"type": "server_vad"}, tools=[{"a": 1}]),
                ambiance=AmbianceOption(path="/a.wav", enabled=False),
                ringback_detection=RingbackDetectionOption(enabled=True, sliding_window_size=4),
                handshake_timeout=10,
                enable_ipv6=True,
                enable_ice_lite=False,
                inactivity_timeout=50,
                subscribe=True,
                sip=SipOption(username="u", password="p", realm="r", contact="sip:c@h",
                              headers={"X-A": "1"}, extract_headers=["X-B"], enable_srtp=True),
                extra={"k": "v"},
            ),
        )
        self.assertEqual(opt.audio_codec, "pcmu")
        assert opt.recorder is not None
        self.assertEqual(opt.recorder.ptime_ms, 200)
        # Wire keys come back exactly as sent (every key above was given explicitly).
        self.assertEqual(json.loads(json.dumps(opt.to_json()))["sip"], obj["sip"])
        self.assertEqual(opt.to_json()["mediaPass"], {**obj["mediaPass"], "packetSize": 3200})


class AliasTests(SynchronousTestCase):
    """Alternative key spellings accepted on input."""

    def _option(self, obj: dict[str, Any]) -> CallOption:
        cmd = command_from_object({"command": "invite", "option": obj})
        assert isinstance(cmd, InviteCommand)
        return cmd.option

    def test_sdp_is_offer(self) -> None:
        """``sdp`` fills ``offer``; ``offer`` wins when both are given."""
        self.assertEqual(self._option({"sdp": "A"}).offer, "A")
        self.assertEqual(self._option({"sdp": "A", "offer": "B"}).offer, "B")
        self.assertEqual(self._option({"sdp": "A"}).to_json()["offer"], "A")

    def test_api_key_is_secret_key(self) -> None:
        """``apiKey`` fills ``secretKey`` in tts, asr, eou and realtime; secretKey wins."""
        opt = self._option({
            "tts": {"apiKey": "t"},
            "asr": {"provider": "p", "apiKey": "a"},
            "eou": {"apiKey": "e"},
            "realtime": {"apiKey": "r", "secretKey": "R"},
        })
        assert opt.tts and opt.asr and opt.eou and opt.realtime
        self.assertEqual(
            (opt.tts.secret_key, opt.asr.secret_key, opt.eou.secret_key, opt.realtime.secret_key),
            ("t", "a", "e", "R"),
        )

    def test_voice_is_synthesis_model(self) -> None:
        """``voice`` fills SynthesisOption ``model``."""
        self.assertEqual(SynthesisOption.from_json({"voice": "v"}, "o"), SynthesisOption(model="v"))
        self.assertEqual(SynthesisOption.from_json({"voice": "v", "model": "m"}, "o").model, "m")

    def test_model_is_transcription_model_type(self) -> None:
        """``model`` fills TranscriptionOption ``modelType``."""
        asr = TranscriptionOption.from_json({"provider": "p", "model": "16k_zh"}, "o")
        self.assertEqual(asr.model_type, "16k_zh")
        self.assertEqual(asr.to_json(), {"provider": "p", "modelType": "16k_zh"})

    def test_enable_srtp_camel_case(self) -> None:
        """``enableSrtp`` fills SipOption ``enable_srtp``; the snake_case spelling wins."""
        self.assertEqual(SipOption.from_json({"enableSrtp": True}, "o").enable_srtp, True)
        self.assertEqual(SipOption.from_json({"enableSrtp": True, "enable_srtp": False}, "o").enable_srtp, False)
        self.assertEqual(SipOption(enable_srtp=True).to_json(), {"enable_srtp": True})

    def test_sdp_m_line_index(self) -> None:
        """The browser spelling ``sdpMLineIndex`` fills ``sdp_mline_index``."""
        cmd = decode_command('{"command":"addIceCandidate","candidate":"c","sdpMLineIndex":0}')
        self.assertEqual(cmd, AddIceCandidateCommand(candidate="c", sdp_mline_index=0))
        self.assertEqual(encode_command(cmd)["sdpMlineIndex"], 0)


class DecodeErrorTests(SynchronousTestCase):
    """Every kind of bad input gives the exact §2.1 error text."""

    def test_bad_inputs(self) -> None:
        """Each bad command raises CommandError with exactly the expected message."""
        failures = []
        for text, message in BAD:
            try:
                decode_command(text)
            except CommandError as err:
                if err.message != message:
                    failures.append(f"{text!r}: {err.message!r} != {message!r}")
            else:
                failures.append(f"{text!r}: no error")
        self.assertEqual(failures, [])

    def test_invalid_json_prefix(self) -> None:
        """Truncated JSON and invalid UTF-8 are reported as ``invalid JSON: …``."""
        for text in ['{"command":', b"\xff\xfe", "", '{"command":"pause"} x']:
            err = self.assertRaises(CommandError, decode_command, text)
            self.assertTrue(err.message.startswith("invalid JSON: "), err.message)

    def test_error_is_value_error_with_message(self) -> None:
        """CommandError is a ValueError whose str() is its message."""
        err = self.assertRaises(CommandError, decode_command, '{"command":"tts"}')
        self.assertIsInstance(err, ValueError)
        self.assertEqual(str(err), err.message)
        self.assertEqual(str(err), "missing field tts.text")


class SipHeaderTests(SynchronousTestCase):
    """Client-supplied SIP headers cannot smuggle lines, override the transaction or grow unbounded."""

    SMUGGLE = "x\r\n\r\nINVITE sip:premium@trunk SIP/2.0"

    def places(self, headers: Any) -> list[tuple[dict[str, Any], str]]:
        """The same headers in every field that sends them, with the path an error names."""
        return [
            ({"command": "invite", "option": {"sip": {"headers": headers}}}, "invite.option.sip.headers"),
            ({"command": "invite", "option": {"sip": {"hangup_headers": headers}}}, "invite.option.sip.hangup_headers"),
            ({"command": "hangup", "headers": headers}, "hangup.headers"),
            ({"command": "message", "body": "b", "headers": headers}, "message.headers"),
            ({"command": "refer", "caller": "", "callee": "sip:b@x", "options": {"sip": {"headers": headers}}},
             "refer.options.sip.headers"),
        ]

    def error(self, obj: dict[str, Any]) -> str:
        err = self.assertRaises(CommandError, decode_command, json.dumps(obj))
        return err.message

    def test_cr_lf_nul_in_values_and_names_are_refused(self) -> None:
        """CR, LF or NUL in a value, or a non-token name, is an error naming the header."""
        for headers, named in [({"X-A": self.SMUGGLE}, "X-A"), ({"X-A": "a\nb"}, "X-A"), ({"X-A": "a\u0000"}, "X-A"),
                               ({"X-A\r\nVia": "v"}, "X-A\r\nVia"), ({"X A": "v"}, "X A"), ({"": "v"}, "")]:
            for obj, path in self.places(headers):
                self.assertTrue(self.error(obj).startswith(f"invalid {path}.{named}: "), (obj, self.error(obj)))

    def test_protected_headers_cannot_be_overridden(self) -> None:
        """Via, Call-ID, CSeq, From, To, Content-Length, Max-Forwards and compact forms, any case."""
        for name in ["Via", "via", "CALL-ID", "CSeq", "From", "to", "Content-Length", "Max-Forwards",
                     "v", "i", "F", "t", "l"]:
            for obj, path in self.places({name: "x"}):
                self.assertEqual(self.error(obj), f"invalid {path}.{name}: {name} is set by activecall and cannot be overridden")

    def test_sizes_are_bounded(self) -> None:
        """At most 32 headers, values up to 1024 characters."""
        for obj, path in self.places({f"X-{i}": "v" for i in range(33)}):
            self.assertEqual(self.error(obj), f"invalid {path}: at most 32 headers")
        for obj, path in self.places({"X-Long": "v" * 1025}):
            self.assertEqual(self.error(obj), f"invalid {path}.X-Long: header value longer than 1024 characters")

    def test_uris_and_credentials_that_reach_headers_are_single_lines(self) -> None:
        """caller/callee (invite, refer) and sip username/realm/contact refuse CR, LF and NUL."""
        bad = "sip:a@b\r\nVia: SIP/2.0/UDP evil"
        for obj, path in [
            ({"command": "invite", "option": {"callee": bad}}, "invite.option.callee"),
            ({"command": "invite", "option": {"caller": bad}}, "invite.option.caller"),
            ({"command": "refer", "caller": "", "callee": bad}, "refer.callee"),
            ({"command": "invite", "option": {"sip": {"username": "u\n"}}}, "invite.option.sip.username"),
            ({"command": "invite", "option": {"sip": {"realm": "r\u0000"}}}, "invite.option.sip.realm"),
            ({"command": "invite", "option": {"sip": {"contact": bad}}}, "invite.option.sip.contact"),
        ]:
            self.assertEqual(self.error(obj), f"invalid {path}: must not contain CR, LF, NUL or other control characters")

    def test_message_content_type_is_one_bounded_line(self) -> None:
        """message.contentType becomes a header: CR/LF smuggling and 1025 characters are refused; a normal one passes."""
        for bad, why in [(self.SMUGGLE, "must not contain CR, LF"), ("t" * 1025, "longer than 1024 characters")]:
            message = self.error({"command": "message", "body": "b", "contentType": bad})
            self.assertTrue(message.startswith("invalid message.contentType: "), message)
            self.assertIn(why, message)
        command = decode_command(json.dumps({"command": "message", "body": "b", "contentType": "application/json"}))
        self.assertEqual(command.content_type, "application/json")

    def test_ordinary_headers_pass(self) -> None:
        """32 extension headers with tabs, quotes and 1024-character values are accepted."""
        headers = {f"X-Tenant-{i}": "a\tb \"q\" " + "v" * 1000 for i in range(32)}
        command = decode_command(json.dumps({"command": "hangup", "headers": headers}))
        self.assertEqual(command.headers, headers)


class EncodeTests(SynchronousTestCase):
    """encode_command gives the wire JSON back."""

    def test_round_trip(self) -> None:
        """Decoding the encoding of every valid command gives the same command."""
        for text, expected in VALID:
            wire = encode_command(decode_command(text))
            self.assertEqual(next(iter(wire)), "command")
            self.assertEqual(decode_command(json.dumps(wire)), expected, text)

    def test_exact_wire_when_fully_specified(self) -> None:
        """A command giving every field encodes back to the identical JSON object."""
        for text in [
            '{"command":"tts","text":"t","speaker":"s","playId":"p","autoHangup":true,"streaming":false,'
            '"endOfStream":true,"option":{"provider":"x","samplerate":8000,"speed":1.5,"volume":3,'
            '"codec":"pcm","subtitle":true,"model":"m","secretKey":"k","extra":{"a":"b"}},'
            '"waitInputTimeout":3000,"base64":false,"cacheKey":"c"}',
            '{"command":"play","url":"u","playId":"p","autoHangup":false,"waitInputTimeout":1,"offsetMs":2}',
            '{"command":"hangup","reason":"r","initiator":"caller","headers":{"X":"1"},"refer":false}',
            '{"command":"message","body":"b","contentType":"text/plain;charset=utf-8","headers":{},"refer":true}',
            '{"command":"addIceCandidate","candidate":"c","sdpMid":"0","sdpMlineIndex":0}',
            '{"command":"custom","sender":"s","data":null}',
            '{"command":"pause"}',
        ]:
            self.assertEqual(encode_command(decode_command(text)), json.loads(text), text)

    def test_none_fields_omitted(self) -> None:
        """Fields without a value are left out; defaults with a value are written."""
        self.assertEqual(
            encode_command(TtsCommand(text="x")),
            {"command": "tts", "text": "x", "autoHangup": False, "streaming": False,
             "endOfStream": False, "base64": False},
        )
        self.assertEqual(encode_command(MuteCommand()), {"command": "mute"})
        self.assertEqual(encode_command(CustomCommand()), {"command": "custom", "data": None})

    def test_call_option_serializes_sip_null(self) -> None:
        """A serialized CallOption always has ``sip`` (null when absent), as in ``/list``."""
        self.assertEqual(
            CallOption().to_json(),
            {"codec": "pcm", "sampleRate": 16000, "enableIpv6": False, "subscribe": False, "sip": None},
        )

    def test_option_defaults_serialized(self) -> None:
        """Options whose missing keys take defaults serialize those defaults with wire names."""
        self.assertEqual(
            RecorderOption().to_json(), {"recorderFile": "", "samplerate": 16000, "ptime": 200}
        )
        self.assertEqual(
            ReferOption().to_json(),
            {"timeout": 30, "autoHangup": True, "pauseParentAsr": False, "forwardDtmf": True, "sipRefer": False},
        )
        self.assertEqual(
            VadOption().to_json(),
            {"type": "silero", "samplerate": 16000, "speechPadding": 250, "silencePadding": 100,
             "ratio": 0.5, "voiceThreshold": 0.5, "maxBufferDurationSecs": 50},
        )
        self.assertEqual(
            AgcOption().to_json(),
            {"headroomDb": 5.0, "maxGainDb": 50.0, "initialGainDb": 15.0,
             "maxGainChangeDbPerSecond": 6.0, "maxOutputNoiseLevelDbfs": -50.0,
             "adjacentSpeechFramesThreshold": 12, "enableLimiter": True},
        )
        self.assertEqual(
            RingbackDetectionOption().to_json(),
            {"enabled": False, "modelWeightsPath": "./telcoclassifier_weights.bin",
             "minBufferSecs": 6.0, "detectionIntervalSecs": 2.0, "confidenceThreshold": 0.5,
             "onStateChangeOnly": True, "slidingWindowSize": 6, "finalConfidenceThreshold": 0.9},
        )
        self.assertEqual(SynthesisOption().to_json(), {})


class MergeTests(SynchronousTestCase):
    """Option merge rules of §4.1 and §4.6."""

    def test_synthesis_defaults(self) -> None:
        """with_defaults fills 16000 Hz, speed 1.0, volume 5 and pcm, keeping given values."""
        self.assertEqual(
            SynthesisOption(provider="p").with_defaults(),
            SynthesisOption(provider="p", samplerate=16000, speed=1.0, volume=5, codec="pcm"),
        )
        self.assertEqual(SynthesisOption(volume=0, speed=0.5).with_defaults().volume, 0)

    def test_synthesis_merge(self) -> None:
        """Command option wins field by field; the four defaulted fields are never inherited."""
        base = SynthesisOption(provider="aliyun", speaker="a", samplerate=8000, speed=1.5,
                               volume=9, codec="mp3", secret_key="k")
        cmd = SynthesisOption(speaker="b", volume=2)
        self.assertEqual(
            cmd.merged_over(base),
            SynthesisOption(provider="aliyun", speaker="b", samplerate=16000, speed=1.0,
                            volume=2, codec="pcm", secret_key="k"),
        )
        self.assertEqual(cmd.merged_over(None), cmd.with_defaults())

    def test_call_option_merge(self) -> None:
        """Missing asr/tts/vad/denoise/agc/recorder/eou/extra/ambiance/ringbackDetection/realtime/sip come from the base."""
        base = CallOption(
            callee="sip:old@x", asr=TranscriptionOption(provider="a"), tts=SynthesisOption(provider="t"),
            vad=VadOption(), denoise=False, agc=AgcOption(), recorder=RecorderOption(),
            eou=EouOption(), extra={"k": "v"}, ambiance=AmbianceOption(path="p"),
            ringback_detection=RingbackDetectionOption(), realtime=RealtimeOption(provider="openai"),
            sip=SipOption(username="u"), media_pass=MediaPassOption("ws://x", 1, 2), playbook="pb",
        )
        new = CallOption(caller="sip:me@x", tts=SynthesisOption(provider="new"), denoise=True)
        merged = new.merged_over(base)
        self.assertEqual(merged.tts, SynthesisOption(provider="new"))
        self.assertEqual(merged.denoise, True)
        for name in ("asr", "vad", "agc", "recorder", "eou", "extra", "ambiance",
                     "ringback_detection", "realtime", "sip"):
            self.assertEqual(getattr(merged, name), getattr(base, name), name)
        # Not part of the merge rule.
        self.assertIsNone(merged.callee)
        self.assertIsNone(merged.media_pass)
        self.assertIsNone(merged.playbook)
        self.assertEqual(merged.caller, "sip:me@x")
        self.assertIs(new.merged_over(None), new)

    def test_ambiance_defaults(self) -> None:
        """Ambiance fields not given take 0.1/0.3/0.01/true, given ones are kept."""
        self.assertEqual(
            AmbianceOption(path="a", duck_level=0.2).with_defaults(),
            AmbianceOption(path="a", duck_level=0.2, normal_level=0.3, transition_speed=0.01, enabled=True),
        )

    def test_audio_codec(self) -> None:
        """The /call codec is case-insensitive and unknown names mean pcm."""
        self.assertEqual(CallOption(codec="G722").audio_codec, "g722")
        self.assertEqual(CallOption(codec="opus").audio_codec, "pcm")

    def test_play_id_defaults_to_url(self) -> None:
        """A play without playId reports its URL as playId."""
        self.assertEqual(PlayCommand(url="u").effective_play_id, "u")
        self.assertEqual(PlayCommand(url="u", play_id="").effective_play_id, "")


# Keys the decoder knows, so generated objects reach nested option paths.
_KEYS = sorted(
    {"command", "option", "options", "recorder", "sip", "tts", "asr", "vad", "agc", "mediaPass",
     "realtime", "eou", "ambiance", "ringbackDetection", "headers", "extra", "text", "url", "code",
     "sampleRate", "speed", "format", "enable_srtp", "enableSrtp", "graceful", "data", "provider",
     "sdp", "offer", "apiKey", "sdpMLineIndex", "timeout", "tools"}
    | set(COMMAND_TYPES)
)
_SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(_KEYS) | st.text(max_size=5)
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=3), inner, max_size=5),
    max_leaves=25,
)


class FuzzTests(SynchronousTestCase):
    """The decoder fails only with CommandError."""

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(sorted(COMMAND_TYPES)), st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=6))
    def test_any_object_decodes_or_raises_command_error(self, name: str, body: dict[str, Any]) -> None:
        """Arbitrary JSON under a known command gives a command that round-trips, or a CommandError."""
        obj = {**body, "command": name}
        try:
            cmd = command_from_object(obj)
        except CommandError as err:
            self.assertRegex(err.message, r"^(missing field|invalid) " + name + r"\.")
        else:
            self.assertEqual(command_from_object(json.loads(json.dumps(encode_command(cmd)))), cmd)

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=40) | st.binary(max_size=40))
    def test_any_text_decodes_or_raises_command_error(self, text: str | bytes) -> None:
        """Arbitrary frame text never raises anything but CommandError."""
        try:
            decode_command(text)
        except CommandError:
            pass


class HugeNumberTests(SynchronousTestCase):
    """A JSON integer too large for a float is a clear error, not an OverflowError."""

    def test_huge_speed(self) -> None:
        """tts.option.speed with 400 digits is ``invalid tts.option.speed``."""
        err = self.assertRaises(CommandError, decode_command,
                                '{"command":"tts","text":"x","option":{"speed":' + "7" * 400 + "}}")
        self.assertEqual(err.message, "invalid tts.option.speed: expected a number")
