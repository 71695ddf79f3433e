"""Hydra finds this plugin by itself (every module of the `hydra_plugins` namespace package is scanned), so
conf/train.yaml composes wherever Hydra composes it: train.py, sweep.py, a notebook's or a test's
`initialize_config_dir(...)` + `compose("train")`, with nothing of this project imported first.

Its one job is to put the config schemas (the `trainer` group's, derived from TrainSettings) into Hydra's
ConfigStore before a config is composed. That happens in `manipulate_search_path`, which Hydra calls for every
composition and before any config is loaded; the search path itself is left as it is. Registering there, not
on import, keeps other Hydra apps of the same environment from importing this project when Hydra scans its
plugins.
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class PerceiverSchemas(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from perceiver.experiment.config import register_schemas

        register_schemas()
