"""Describe Anything: detailed localized captioning of image regions and video masklets."""
