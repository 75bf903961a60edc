"""A YOLO-family object detector trainer with YOLOv5's training recipe."""

__version__ = "0.1.0"
