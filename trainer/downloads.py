"""Files fetched over the network when a network is there: YOLOv5's release weights and a data
YAML's `download:` zip. Nothing from a YAML is ever executed.

A download goes to `<destination>.part` (kept between tries, so a cut one resumes with an HTTP
Range request), is checked against the server's length and a minimum size, and is renamed into
place: a reader never sees half a file. Processes fetching the same file wait on a file lock
and find it there. Without a network, one line names the URL and where to put the file.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from filelock import FileLock

from trainer.errors import CannotWrite, UserError
from trainer.paths import resolve_config

LOGGER = logging.getLogger("trainer")

# YOLOv5 v7.0's detection weights, as `--weights yolov5s.pt` names them; $EVOLVECTL_WEIGHTS_URL
# points at a mirror (the same file names under one URL).
RELEASE_URL = "https://github.com/ultralytics/yolov5/releases/download/v7.0"
RELEASE_ASSETS = frozenset(f"yolov5{size}{p6}.pt" for size in "nsmlx" for p6 in ("", "6"))
WEIGHTS_URL_ENV = "EVOLVECTL_WEIGHTS_URL"
WEIGHTS_CACHE_ENV = "EVOLVECTL_WEIGHTS"
MIN_WEIGHTS_BYTES = 100_000  # smaller is an error page, not a model (YOLOv5 checks the same)
ATTEMPTS = 3
TIMEOUT_S = 30.0


def resolve_weights(name: str | Path) -> Path:
    """--weights as a file: a path, a bundled name (yolov5n-synthetic), or a YOLOv5 release name
    (yolov5s.pt) or URL, downloaded into the weights cache when it is not there yet."""
    try:
        return resolve_config(name, "weights")
    except UserError:
        downloaded = release_weights(str(name))
        if downloaded is None:
            raise
        return downloaded


def weights_cache() -> Path:
    """Where downloaded weights live: $EVOLVECTL_WEIGHTS, else ~/.cache/evolvectl/weights."""
    configured = os.environ.get(WEIGHTS_CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "evolvectl" / "weights"


def release_weights(name: str) -> Path | None:
    """A YOLOv5 release name (yolov5s.pt) or an http(s) URL of a .pt file: its cached copy,
    downloaded first if missing. None for any other name."""
    if name.startswith(("http://", "https://")):
        url, file_name = name, Path(name.split("?")[0]).name
    elif name in RELEASE_ASSETS:
        url, file_name = f"{os.environ.get(WEIGHTS_URL_ENV, RELEASE_URL).rstrip('/')}/{name}", name
    else:
        return None
    destination = weights_cache() / file_name
    fetch(url, destination, MIN_WEIGHTS_BYTES)
    return destination


def fetch(url: str, destination: Path, min_bytes: int = 1) -> None:
    """Download `url` to `destination` unless it is there already; see the module's docstring."""
    if destination.is_file():
        return
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {destination.parent} for {url} ({error.strerror}); "
                        f"download it yourself into {destination}") from None
    with FileLock(f"{destination}.lock"):
        if destination.is_file():  # another process fetched it while this one waited
            return
        partial = destination.with_name(destination.name + ".part")
        for attempt in range(1, ATTEMPTS + 1):
            try:
                _download(url, partial)
                break
            except (urllib.error.URLError, TimeoutError, ConnectionError, IncompleteDownload) as error:
                missing = isinstance(error, urllib.error.HTTPError) and error.code in (403, 404, 410)
                if missing or attempt == ATTEMPTS:  # a missing file: no retry will find it
                    raise UserError(
                        f"cannot download {url} ({_reason(error)}); without a network, download it yourself "
                        f"and put it at {destination}"
                    ) from None
                LOGGER.warning("download of %s failed (%s); trying again", url, _reason(error))
                time.sleep(attempt)
            except OSError as error:  # the disk, not the network: a full or read-only one is one line
                full = CannotWrite.from_os_error(error, partial)
                if full is None:
                    raise
                raise full from None
        size = partial.stat().st_size
        if size < min_bytes:
            partial.unlink()
            raise UserError(f"{url} gave {size} bytes, too few for what it names; check the URL, or download "
                            f"it yourself and put it at {destination}")
        os.replace(partial, destination)
    LOGGER.info("Downloaded %s to %s", url, destination)


class IncompleteDownload(Exception):
    """The connection ended before the length the server announced."""


def _download(url: str, partial: Path) -> None:
    """One try: go on from what `partial` holds (an HTTP Range request), to the announced length."""
    from trainer.progress import DownloadBar  # rich and torch: only once a download starts
    have = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # the range starts at the end: it was complete
            return
        raise
    with response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with partial.open("ab" if have else "wb") as output, DownloadBar(Path(url).name, total, have) as advance:
            while chunk := response.read(1 << 20):
                output.write(chunk)
                advance(len(chunk))
        if total is not None and partial.stat().st_size != total:
            raise IncompleteDownload(f"{partial.stat().st_size} of {total} bytes")


def _reason(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


def download_dataset(url: str, datasets: Path, config: Path) -> None:
    """A data YAML's `download:` zip, fetched into `datasets` and unpacked there, as YOLOv5 does
    for coco128.yaml. Anything but an http(s) URL of a .zip is refused: YOLOv5 runs `bash ...`
    and Python code found there, and this never runs code from a YAML."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or \
            not url.split("?")[0].endswith(".zip"):
        shown = url if isinstance(url, str) and len(url) < 80 else f"{str(url)[:77]}..."
        raise UserError(f"{config}: download: {shown!r} is not an http(s) URL of a .zip; evolvectl never runs "
                        "code from a data YAML: fetch the dataset yourself and point `path` at it")
    archive = datasets / Path(url.split("?")[0]).name
    try:
        datasets.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the datasets folder {datasets} ({error.strerror}); "
                        "set EVOLVECTL_DATASETS to a folder you can write") from None
    with FileLock(f"{archive}.unpack.lock"):
        marker = archive.with_name(archive.name + ".unpacked")
        if marker.is_file():
            return
        fetch(url, archive)
        try:
            with zipfile.ZipFile(archive) as bundle:
                for member in bundle.namelist():  # no absolute paths or .. that would write outside
                    target = (datasets / member).resolve()
                    if not target.is_relative_to(datasets.resolve()):
                        raise UserError(f"{url}: the archive's {member!r} lies outside {datasets}; not unpacked")
                LOGGER.info("Unpacking %s into %s", archive.name, datasets)
                bundle.extractall(datasets)
        except zipfile.BadZipFile:
            archive.unlink()
            raise UserError(f"{url} is not a zip archive; check the URL in {config}") from None
        marker.touch()
        archive.unlink()

