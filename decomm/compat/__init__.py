"""Compatibility layers that let programs written for other libraries run on decomm.

``decomm.compat.bluefog`` reproduces BlueFog 0.3's ``bluefog.torch`` API.
"""
