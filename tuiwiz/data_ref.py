"""Building a `DatasetRef` from what a front end was given, with the bundled demo as the default."""

from __future__ import annotations

from tuiwiz.demo import DEMO_DATASET
from tuiwiz.errors import BadValue
from tuiwiz.preset import DatasetRef


def dataset_ref_from_args(path: str | None, layout: str | None, current: DatasetRef | None) -> DatasetRef:
    """A DatasetRef from a path and layout; what is not given comes from `current`, else the demo."""
    if path is not None and not path.strip():
        raise BadValue("dataset", path, "is empty; give a dataset file or folder")
    if path is None:
        path = current.path if current is not None else str(DEMO_DATASET)
    return DatasetRef(path=path, layout=layout or (current.layout if current is not None else None),
                      columns=current.columns if current is not None else None,
                      system_prompt=current.system_prompt if current is not None else None)
