"""Task plug-ins: imported lazily by name, options checked against the dataset formats."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medai.config import from_dict
from medai.errors import ConfigError


def test_get_task_imports_only_the_task_it_names():
    code = ("import sys; from medai.pipelines.tasks import get_task; get_task('classification'); "
            "print(sorted(m for m in sys.modules if m == 'polars' or m.startswith('medai.pipelines.tasks.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['medai.pipelines.tasks.classification']"  # no polars, no EHR task


def test_get_task_finds_a_task_in_its_prefix_module_and_names_similar_ones_on_a_typo():
    from medai.pipelines.tasks import get_task

    assert type(get_task("ehr_pretrain")).__module__ == "medai.pipelines.tasks.ehr"
    with pytest.raises(KeyError, match="unknown task 'ehr_finetune'; did you mean ehr_pretrain, ehr_multitask"):
        get_task("ehr_finetune")


def test_an_unknown_dataset_format_is_a_config_error():
    from medai.pipelines.tasks.classification import ClassificationOptions
    from medai.pipelines.tasks.mil import MILOptions

    with pytest.raises(ConfigError, match="unknown images dataset format 'npz'"):
        from_dict(ClassificationOptions, {"format": "npz"})
    assert from_dict(MILOptions, {"format": "medmnist_bags"}).format == "medmnist_bags"
