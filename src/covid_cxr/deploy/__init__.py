"""Deployment: ONNX export and runtime (:mod:`.onnx`), the web service (:mod:`.server`), input expansion (:mod:`.files`).

Everything here rebuilds the network, its classes and its preprocessing from one file: a
covid-cxr checkpoint or an ONNX model exported from one.
"""
