"""Voice activity detection, batched across calls (Silero on onnxruntime) or per call (WebRTC VAD)."""
