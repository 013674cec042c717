"""The values a few command-line options accept, in a module that imports nothing heavy.

``covid-cxr VERB --help`` lists them without loading torch; the modules that act on them
(:mod:`covid_cxr.runtime`, :mod:`covid_cxr.gradcam`, :mod:`covid_cxr.inference`) import them from
here, so the parser and the library cannot disagree.
"""

from __future__ import annotations

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # autocast precision (covid_cxr.runtime.choose_runtime)
CAM_METHODS = ("auto", "hirescam", "gradcam")  # covid_cxr.gradcam: auto picks by the network's head
BACKENDS = ("auto", "torch", "onnx")  # covid_cxr.inference.backends.choose_backend
COMPILE_CHOICES = ("auto", "on", "off")  # covid_cxr.inference.torch_model.should_compile
# torch.compile of the concatenated network takes ~30 s on 2 cores and then saves ~12% per image at batch 20
# (benchmarks/RESULTS.md: 9.4 -> 10.5 images/s at 300 px); below this many images it costs more than it saves.
COMPILE_MIN_IMAGES = 3000

RESIZE_METHODS: dict[str, str] = {
    "area": "anti-aliased: OpenCV INTER_AREA when shrinking, INTER_LINEAR when enlarging (our checkpoints)",
    "bilinear": "OpenCV INTER_LINEAR, cv2.resize's default, no anti-aliasing (the authors' evaluation)",
    "nearest": "Pillow NEAREST, as Keras load_img resizes (the authors' training generator)",
}
"""How an image is brought to the network's size; a checkpoint records its method (see ``Preprocessing.resize``)."""
