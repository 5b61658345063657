"""Scoliosis in whole-body DXA scans through intermediate representations (Jamaludin et al.).

``constants.py`` parts, classes and levels, ``model.py`` the two networks,
``preprocess.py`` height normalisation and view checks, ``inference.py`` the
array pipeline, ``geometry.py`` curve geometry, ``evaluate.py`` held-out
figures, ``analyzer.py`` the contract, ``phantom.py`` synthetic studies,
``train.py`` training and calibration, ``weights/`` the bundled phantom-trained
ONNX files.
"""
