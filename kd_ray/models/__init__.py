"""Components: students, teachers, losses, inference, multi-task heads, ONNX files, metrics (Ray-free)."""
