"""Deployment: ONNX and int8 export (:mod:`.onnx`, :mod:`.quantize`), the web service (:mod:`.server`), model cards.

Everything here rebuilds the network, its classes and its preprocessing from one file: a
covid-cxr checkpoint or an ONNX model exported from one.
"""
