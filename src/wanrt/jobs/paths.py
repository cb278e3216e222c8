"""Where a data dir keeps things: the SQLite file, input images, output videos."""

from __future__ import annotations

from pathlib import Path


class DataPaths:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.db = self.root / "jobs.sqlite3"
        self.inputs = self.root / "inputs"
        self.outputs = self.root / "outputs"

    def ensure(self) -> "DataPaths":
        for d in (self.root, self.inputs, self.outputs):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def input_path(self, job_id: str, extension: str) -> Path:
        return self.inputs / f"{job_id}_input.{extension}"

    def output_path(self, job_id: str) -> Path:
        return self.outputs / f"wanrt_{job_id}.mp4"

    def remove_job_files(self, job_id: str, input_image: str | None = None, keep_input: bool = False) -> list[str]:
        removed = []
        candidates = [self.output_path(job_id), self.outputs / f".{self.output_path(job_id).name}.part"]
        if input_image and not keep_input:
            candidates.append(self.inputs / Path(input_image).name)
        for path in candidates:
            try:
                path.unlink()
                removed.append(str(path))
            except FileNotFoundError:
                pass
        return removed
