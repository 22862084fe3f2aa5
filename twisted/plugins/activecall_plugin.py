from twisted.application.service import ServiceMaker

activecall = ServiceMaker(
    "activecall",
    "activecall.tap",
    "Telephony daemon for AI voice agents (SIP, RTP, WebRTC, WebSocket audio).",
    "activecall",
)
