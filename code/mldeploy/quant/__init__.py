"""Section 5.3: quantization. The model being compressed (``charlm``), the arithmetic
(``fake_quant``), INT8 post-training quantization in ONNX Runtime (``int8_ptq``), INT4 files
(``int4_onnx``), weight-only algorithms (``gptq``, ``awq``, ``weight_only``), quantization-aware
training (``qat``) and the measurements that compare them (``benchmark``, ``plots``)."""
