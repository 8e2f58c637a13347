from .export import check_onnx, export_onnx, onnx_session

__all__ = ["check_onnx", "export_onnx", "onnx_session"]
