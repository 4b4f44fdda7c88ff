"""The objective written in docs/objectives.md runs and passes the shared contract."""

from __future__ import annotations

import re
from pathlib import Path

from contract import ObjectiveContract

DOC = Path(__file__).resolve().parents[2] / "docs" / "objectives.md"


def _doc_objective():
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace["SimSiam"]


class TestDocumentedObjective(ObjectiveContract):
    def make_objective(self, crop_size: int):
        return _doc_objective()(crop_size=crop_size, proj_dim=16)
