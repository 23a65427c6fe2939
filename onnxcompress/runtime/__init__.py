"""ONNX Runtime: sessions, captured activations, accuracy and verification, latency."""
