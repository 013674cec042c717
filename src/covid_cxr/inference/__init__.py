"""Inference: uint8 grayscale X-rays in, class probabilities and the decided class out.

- :mod:`.protocol`: what every backend offers (:class:`~.protocol.Predictor`), batch checks, batched prediction;
- :mod:`.torch_model`: the PyTorch backend (BatchNorm folding, ``torch.compile``);
- :mod:`.onnx_model`: the ONNX Runtime backend, and the torch -> ONNX export it runs (:mod:`.onnx_graph`);
- :mod:`.settings`: how to run a model (batch size, device, precision, backend), one value every caller passes;
- :mod:`.backends`: which backend answers a model file on this machine, and opening it;
- :mod:`.inputs`, :mod:`.sink`: the files a user named, and where the rows go;
- :mod:`.pipeline`: decode -> predict -> decide, for files (``predict``) and uploads (``serve``).
"""
