"""A YOLO-family object detector trainer with YOLOv5's training recipe."""

import os

# OpenMP threads that spin while waiting turn a CPU training into a crawl (10-30x slower,
# measured) as soon as the cores are shared: with dataloader workers, with several evolution
# workers on one machine, or beside any other load. Sleeping waiters cost little when the
# cores are free. The runtime reads this when torch is first imported, so it is set here,
# before any of our modules imports torch; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
