"""Shared utilities of genpan: the COCO panoptic format, configuration, atomic file I/O."""
