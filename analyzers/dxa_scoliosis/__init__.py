"""Scoliosis in whole-body DXA scans through intermediate representations (Jamaludin et al.).

``model.py`` the two networks, ``preprocess.py`` height normalisation and view
checks, ``pipeline.py`` inference maths, ``geometry.py`` curve geometry,
``analyzer.py`` the contract, ``phantom.py`` synthetic studies, ``train.py``
training and evaluation, ``weights/`` the bundled phantom-trained ONNX files.
"""
