"""ONNX: `export.export_onnx` writes the image encoder, the text encoder and psi as three graphs with a manifest;
`runtime` holds the onnxruntime-backed parts that `talk2dino.factory.load_onnx_model` wires into a `Talk2DINO`.

Needs the ``onnx`` extra. Nothing is imported here, so ``import talk2dino.onnx`` stays light.
"""
