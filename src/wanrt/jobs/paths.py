"""Where a data dir keeps things: the SQLite file, input images, output videos and live previews (a folder of
their own, so outputs/ only ever holds videos)."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("wanrt.paths")
_JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # uuid4, as the API names jobs
STRAY_AFTER_S = 3600.0  # a file of no job is removed this long after its last change (the create race is seconds)


def fsync_dir(path: str | Path) -> None:
    """Make a rename (or create, or unlink) in directory `path` durable. Best effort: some platforms and
    filesystems cannot open a directory or fsync one, and there the rename is as durable as they make it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DataPaths:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.db = self.root / "jobs.sqlite3"
        self.inputs = self.root / "inputs"
        self.outputs = self.root / "outputs"
        self.previews = self.root / "previews"

    def ensure(self) -> "DataPaths":
        for d in (self.root, self.inputs, self.outputs, self.previews):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def input_path(self, job_id: str, extension: str) -> Path:
        return self.inputs / f"{job_id}_input.{extension}"

    def output_path(self, job_id: str) -> Path:
        return self.outputs / f"wanrt_{job_id}.mp4"

    def preview_path(self, job_id: str) -> Path:
        """The latest live preview (animated WebP), replaced after each denoising step."""
        return self.previews / f"{job_id}.webp"

    def preview_info_path(self, job_id: str) -> Path:
        """What the preview shows (step, steps, frames, size), written after the WebP."""
        return self.previews / f"{job_id}.json"

    def preview_info(self, job_id: str) -> dict | None:
        """The preview's info, or None before the first step (or with previews off)."""
        try:
            info = json.loads(self.preview_info_path(job_id).read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def remove_job_files(self, job_id: str, input_image: str | None = None, keep_input: bool = False) -> list[str]:
        """The job's video, previews and every run's temporary files (`.NAME.part`, or `.NAME.TOKEN.part`: each
        run writes its own, so that a run that lost its job never touches the new owner's)."""
        removed = []
        candidates = []
        for path in (self.output_path(job_id), self.preview_path(job_id), self.preview_info_path(job_id)):
            candidates += [path, *path.parent.glob(f".{glob.escape(path.name)}*.part")]
        if input_image and not keep_input:
            candidates.append(self.inputs / Path(input_image).name)
        for path in candidates:
            try:
                path.unlink()
                removed.append(str(path))
            except FileNotFoundError:
                pass
            except OSError as e:  # one file that cannot go must not keep the others (or the next jobs') in place
                log.warning("could not remove %s: %s", path, e)
        return removed

    def remove_stray_files(self, older_than_s: float, job_status: Callable[[str], str | None]) -> list[str]:
        """Files left by no job, unchanged for `older_than_s`: a kill -9 between writing an input and creating its
        job, or between deleting a job and its files, and temp files (`.part`) of runs that died. A file whose job
        is known stays, but a temp file only while its job runs. `job_status(id)`: the job's status, or None when
        the store has no such job. Only names holding a job id are touched."""
        cutoff, removed = time.time() - older_than_s, []
        for folder in (self.inputs, self.outputs, self.previews):
            with os.scandir(folder) as entries:
                for entry in entries:
                    match = _JOB_ID.search(entry.name)
                    try:
                        if match is None or not entry.is_file(follow_symlinks=False) or entry.stat().st_mtime >= cutoff:
                            continue
                        status = job_status(match.group(0))
                        if status is None or (entry.name.endswith(".part") and status != "processing"):
                            os.unlink(entry.path)
                            removed.append(entry.path)
                    except OSError as e:  # gone meanwhile, or not ours to remove: the next file
                        log.warning("could not remove stray file %s: %s", entry.path, e)
        return removed
