"""`--cache disk`: decoded, resized images kept as .npy files for later runs.

Reading pixels back from a .npy file costs a fraction of decoding and resizing a JPEG. Unlike
`--cache ram`, the cache takes no memory and outlives the process: the next run, and every
evolution worker reading the same data set, reuse it.

The files sit beside a split's images, in `<image folder>-cache/<imgsz>/` for validation and in
`<image folder>-cache/<imgsz>-training/` for training, whose images are resized differently.
Each is named by a hash of its image's path (relative to the data set, so a container that
mounts it elsewhere finds the same file), size and modification time: a changed image gets a
new file, and splits of one kind that share images share their files. Old files are never deleted; remove
the folder to reclaim the space. Every file is written atomically, so workers filling one cache
at once, or a run killed while filling it, leave only whole files; a file that cannot be read is
decoded again.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from trainer.files import write_atomic

logger = logging.getLogger("trainer")


class DiskCache:
    """One .npy file per image of `files`, resized as the folder `variant` (`640`, `640-training`) says."""

    def __init__(self, files: Sequence[Path], variant: str) -> None:
        root = files[0].parent.with_name(files[0].parent.name + "-cache")
        self.folder = root / variant
        self.paths = [self.folder / f"{self._key(file, root.parent)}.npy" for file in files]

    @staticmethod
    def _key(file: Path, base: Path) -> str:
        stat = file.stat()
        return hashlib.sha1(f"{os.path.relpath(file, base)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()

    def fill(self, read: Callable[[int], torch.Tensor]) -> bool:
        """Write the missing files, `read(index)` giving an image's pixels.

        False, after a warning, when the folder cannot be written (a read-only data set): the
        images are then decoded as without a cache.
        """
        missing = [index for index, path in enumerate(self.paths) if not path.is_file()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # decoding releases the GIL
                written = sum(pool.map(lambda index: self._write(index, read(index)), missing))
        except OSError as error:
            logger.warning("cannot write the image cache %s (%s); images will be decoded as usual",
                           self.folder, error.strerror or error)
            return False
        logger.info("%d images cached on disk in %s%s", len(self.paths), self.folder,
                    f" ({len(missing)} new, {written / 2**20:.0f} MB)" if missing else "")
        return True

    def _write(self, index: int, image: torch.Tensor) -> int:
        buffer = io.BytesIO()
        np.save(buffer, image.numpy())
        write_atomic(self.paths[index], buffer.getvalue())
        return buffer.tell()

    def read(self, index: int) -> torch.Tensor | None:
        """The cached pixels, or None when the file is missing or unreadable."""
        try:
            return torch.from_numpy(np.load(self.paths[index], allow_pickle=False))
        except (OSError, ValueError):
            return None
