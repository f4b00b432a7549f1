"""The method registry: a method is one record, and nothing else in the project knows its name.

The proof: a method registered from this test module (Proxy-Anchor with its loss doubled, a
function defined here) trains, stops, resumes, embeds and exports through the real trainer and
commands. The built-in records are checked against what the trainer builds for them.
"""

from __future__ import annotations

import inspect
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from hdml_jax import losses, main, methods
from hdml_jax.config import unused_overrides, validate
from hdml_jax.errors import ConfigError
from hdml_jax.inference import embed, export
from hdml_jax.methods import Method, proxy
from hdml_jax.training import train
from tests.numerics import assert_close
from tests.test_train import tiny_config, tiny_network_terms
from tests.tiny_data import tiny_dataset

NAME = "doubled_proxy_anchor"
TRACED: list[tuple[int, ...]] = []  # the embedding shapes the registered loss was traced with


def doubled_proxy_anchor_loss(embeddings, labels, proxies, *, margin, alpha, mask=None, proxy_mask=None):
    """2 × Proxy-Anchor: the loss the registered method names (a function of this module)."""
    TRACED.append(tuple(embeddings.shape))
    return 2.0 * losses.proxy_anchor_loss(
        embeddings, labels, proxies, margin=margin, alpha=alpha, mask=mask, proxy_mask=proxy_mask
    )


@pytest.fixture
def doubled():
    record = methods.register(
        Method(
            name=NAME,
            summary="Proxy-Anchor with its loss doubled (registered by a test)",
            loss=doubled_proxy_anchor_loss,
            form="proxy",
            recipe=proxy.proxy_anchor_recipe,
            keywords=proxy.proxy_anchor_keywords,
            fields=("loss.margin", "loss.alpha"),
        )
    )
    yield record
    methods.unregister(NAME)


def test_a_method_registered_elsewhere_trains_resumes_embeds_and_exports(doubled, tmp_path, capsys):
    assert f"  {NAME} " in main.usage()  # --help lists the registry
    c = tiny_config(NAME)
    validate(c)
    assert c.method == NAME and c.loss.alpha == 32.0  # the recipe of its record
    assert unused_overrides(c, ["model.descriptors"]) == [
        "model.descriptors has no effect with method doubled_proxy_anchor (used by: cgd)"
    ]
    assert unused_overrides(c, ["loss.alpha", "model.proxy_init"]) == []  # its fields and its form's

    # Half the run, then the same command resumes it from the checkpoint at step 8.
    workdir, dataset = tmp_path / "run", tiny_dataset()
    TRACED.clear()
    with pytest.raises(train.TrainingInterruptedError) as stop:
        train.train_and_evaluate(tiny_config(NAME, stop_after_steps=8), workdir, dataset=dataset)
    assert stop.value.step == 8
    assert TRACED, "the registered loss function was never called"
    train.train_and_evaluate(tiny_config(NAME), workdir, dataset=dataset)
    assert json.loads((workdir / "final_metrics.json").read_text())["step"] == 16
    assert json.loads((workdir / "config.json").read_text())["method"] == NAME
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 16  # no step twice

    # embed: the test images as files give the trainer's own test embeddings.
    folder = tmp_path / "images"
    folder.mkdir()
    chosen = range(0, len(dataset.test.labels), 5)
    for index in chosen:
        Image.fromarray(dataset.test.source[index]["image"]).save(folder / f"{index:03d}.png")
    output = tmp_path / "embeddings.npz"
    argv = ["--workdir", str(workdir), "--images", str(folder), "--output", str(output), "--step", "16"]
    assert embed.main(argv) == 0, capsys.readouterr().err
    with np.load(output) as npz:
        embedded = npz["embeddings"]
    trainer = np.load(workdir / "test_embeddings.npy")
    assert_close(embedded, trainer[list(chosen)], n_terms=tiny_network_terms(), scale=1.0)

    assert export.main(["--workdir", str(workdir), "--output", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "model.jax_export").is_file()


def test_unregistered_and_duplicate_methods_are_refused(doubled):
    with pytest.raises(ValueError, match="already registered"):
        methods.register(doubled)
    methods.unregister(NAME)
    with pytest.raises(ConfigError, match=r"unknown method 'doubled_proxy_anchor'; valid: proxy_anchor, "):
        validate(tiny_config(NAME))
    methods.register(doubled)  # the fixture unregisters it again
    with pytest.raises(ValueError, match="only a proxy loss"):
        Method(name="x", summary="", loss="contrastive_loss", form="pair", recipe=print, hierarchical=True)


@pytest.mark.parametrize("name", methods.names())
def test_each_built_in_record_is_what_the_trainer_builds(name):
    """A record's parts against the model the train step builds from its config."""
    from hdml_jax.training import steps

    record = methods.get(name)
    c = tiny_config(name)
    model = steps.build_model(c, num_classes=8, coarse_groups=(3,))
    assert model.num_proxies == (8 * record.rows_per_class(c) if record.learns_proxies else 0)
    assert bool(model.coarse_groups) == record.hierarchical
    assert type(model.head).__name__ == {"embedding": "EmbeddingHead", "cgd": "CGDHead"}[record.head]
    assert [p[0] for p in model.loss_params] == [p.name for p in record.loss_parameters]
    assert set(record.keywords(c)) <= set(inspect.signature(record.loss_function()).parameters)
    if record.pk_batches:  # the pair losses: P×K batches whatever the family's recipe says
        assert c.sampler == "pk" and c.samples_per_class == 4


def test_installed_plugins_register_their_methods_when_first_needed(monkeypatch):
    """An ``hdml_jax.methods`` entry point is imported when a name is unknown (so ``embed`` of a
    run of a plugin's method works in a fresh process); a broken one is a warning naming it."""
    import importlib.metadata
    import sys

    from hdml_jax.methods import registry

    plugins = [
        importlib.metadata.EntryPoint("mine", "tests.method_plugin", registry.ENTRY_POINT_GROUP),
        importlib.metadata.EntryPoint("broken", "tests.no_such_module", registry.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda group: plugins if group == registry.ENTRY_POINT_GROUP else [],
    )
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.delitem(sys.modules, "tests.method_plugin", raising=False)
    try:
        with pytest.warns(UserWarning, match=r"plugin 'broken' \(tests.no_such_module\) failed to import"):
            record = methods.get("plugin_proxy_anchor")
        assert record.summary == "Proxy-Anchor, from a plugin" and "plugin_proxy_anchor" in methods.names()
        validate(tiny_config("plugin_proxy_anchor"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # loaded once: no second import, no second warning
            assert methods.find("no_such_method") is None
    finally:
        methods.unregister("plugin_proxy_anchor")
