"""``deqfusion compare mmf``: MMF's own training (``mmf_cli.run.run``) of ``fusion_classifier`` once per arm, the
arms one config key apart, ``model_config.fusion_classifier.fusion`` (easy-VQA unless ``-- dataset=NAME``).

Arms: ``deq`` trains the packaged ``<dataset>_deq.yaml``; a baseline fusion trains ``<dataset>_<fusion>.yaml``
when one is packaged (``linear_sum``), else ``<dataset>_common.yaml`` with ``fusion.type`` set to it (its
params: MMF's defaults). Selections: ``val``, MMF's own (the best checkpoint by ``training.early_stop.criteria``
on validation, which MMF restores before its test inference), and ``final`` (the last update).

Fusion options (``-o KEY=VALUE``, ``--f-tol``, ...) reach the `deq` fusion the way ``deqfusion run mmf`` gives them:
carried in the arm's arguments (``--deq-option``), taken out in the worker and registered with `deq`
(:func:`~deqfusion_adapters.mmf.fusion.register_fusions`), which layers them over ``fusion.params``. MMF's own
command line cannot carry them: its ``_merge_with_dotlist`` refuses a key the merged config lacks, so a DEQFusion
keyword that the packaged params leave out could not be set. The effective configuration shows them in
``fusion.params``, as the fusion is built with them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from deqfusion_core.compare import Comparison, RunOutcome, Selection, deq_option_args, split_deq_options

from . import CONFIG_DIR

__all__ = ["MMFComparison"]

EXPERIMENTS = CONFIG_DIR / "experiments"
MODEL = "model_config.fusion_classifier."
SMOKE = ["training.max_updates=4", "training.log_interval=2", "training.checkpoint_interval=2",
         "training.evaluation_interval=2", "training.batch_size=16"]
SMOKE_DATA = {"easy_vqa": ["dataset_config.easy_vqa.max_samples.train=96", "dataset_config.easy_vqa.max_samples.val=32",
                           "dataset_config.easy_vqa.max_samples.test=32"]}
def _dataset(upstream_args: Sequence[str]) -> str:
    named = [a.split("=", 1)[1] for a in upstream_args if a.startswith(("dataset=", "datasets="))]
    return named[-1] if named else "easy_vqa"


class MMFComparison(Comparison):
    integration = "mmf"
    study = "easy_vqa"
    baseline = "linear_sum"
    metric = "accuracy"
    selections = ("val", "final")
    fusion_keys = {
        MODEL + "fusion": "the fusion (its type and params)",
        MODEL + "fusion.params.jac_weight": "DEQ recipe: Jacobian weight",
        MODEL + "fusion.params.dropout": "DEQ recipe: dropout in the fusion",
        MODEL + "fusion_lr": "DEQ recipe: the fusion's learning rate",
        MODEL + "track_gates": "the fusion's statistics (records the DEQ's gates; training is unchanged)",
    }
    not_compared = {"config": "the experiment file's path (its settings are compared key by key)",
                    "env.save_dir": "where the run writes its checkpoints and logs"}

    def study_name(self, upstream_args):
        return _dataset(upstream_args)

    def smoke_args(self, upstream_args):
        return SMOKE + SMOKE_DATA.get(_dataset(upstream_args), [])

    def argv(self, arm, seed, fusion_options, upstream_args, run_dir):
        dataset = _dataset(upstream_args)
        own = EXPERIMENTS / f"{dataset}_{arm.fusion}.yaml"
        common = EXPERIMENTS / f"{dataset}_common.yaml"
        if own.is_file():
            opts = [f"config={own}"]
        elif common.is_file():
            opts = [f"config={common}", f"{MODEL}fusion.type={arm.fusion}"]
        else:
            raise ValueError(f"dataset={dataset}: deqfusion packages no {common.name} (experiments: "
                             f"{', '.join(sorted(p.stem for p in EXPERIMENTS.glob('*_common.yaml')))})")
        if fusion_options and arm.fusion != "deq":
            raise ValueError(f"fusion options ({', '.join(fusion_options)}) are DEQFusion keywords for fusion 'deq'; "
                             f"the fusion under test is {arm.fusion!r} (set its params with --arm-args {arm.name} "
                             f"'{MODEL}fusion.params.KEY=VALUE')")
        opts = [*deq_option_args(fusion_options), *opts, "model=fusion_classifier"]
        if not any(a.startswith(("dataset=", "datasets=")) for a in upstream_args):
            opts.append(f"dataset={dataset}")
        opts += [f"training.seed={seed}", f"env.save_dir={Path(run_dir) / 'save'}", *upstream_args]
        return opts

    # -- in the worker ------------------------------------------------------------------------------------------
    def effective_config(self, upstream, argv) -> dict[str, Any]:
        import argparse

        from . import register
        from .fusion import DEQFusionMMF, params_with_options

        options, argv = split_deq_options(argv)
        mapping = register(options)
        from mmf.utils.configuration import Configuration
        from omegaconf import OmegaConf

        config = Configuration(argparse.Namespace(config_override=None, opts=list(argv))).get_config()
        fusion = OmegaConf.select(config, MODEL + "fusion.type")
        if fusion not in mapping:
            raise KeyError(f"{MODEL}fusion.type: unknown fusion {fusion!r}; MMF's fusion registry has: "
                           f"{', '.join(sorted(mapping))}")
        out = OmegaConf.to_container(config, resolve=True)
        if options:
            if not issubclass(mapping[fusion], DEQFusionMMF):
                raise KeyError(f"{MODEL}fusion.type: {fusion!r} takes no DEQFusion options (given: "
                               f"{', '.join(options)})")
            node = out["model_config"]["fusion_classifier"]["fusion"]
            node["params"] = params_with_options(node.get("params") or {}, options)
        return out

    def train(self, upstream, argv, run_dir, progress) -> RunOutcome:
        from . import register

        options, argv = split_deq_options(argv)
        register(options)
        from mmf.common.registry import registry
        from mmf.utils.checkpoint import Checkpoint
        from mmf_cli.run import run

        evals: list[dict] = []
        state: dict[str, Any] = {"phase": "training", "trainer": None}
        owner, name, split_of = _evaluation_hook()
        evaluate, restore = getattr(owner, name), Checkpoint.restore

        def recording_evaluate(trainer, what, *args, **kwargs):
            report, meter = evaluate(trainer, what, *args, **kwargs)
            split = split_of(trainer, what)
            metrics = _metrics(meter, split)
            state["trainer"] = trainer
            evals.append({"split": split, "update": trainer.num_updates, "phase": state["phase"], "metrics": metrics})
            if split == "val" and state["phase"] == "training":
                progress(done=trainer.num_updates, total=trainer.max_updates, unit="update",
                         metric={f"val {k}": v for k, v in metrics.items()})
            return report, meter

        def restore_after_final_test(checkpoint):
            # the last update's test metrics ("final"), before MMF restores its best checkpoint for its own test
            trainer = checkpoint.trainer
            if state["phase"] == "training":
                state["phase"] = "final"
                if any(rt in trainer.run_type for rt in ("inference", "test")):
                    _evaluate(trainer, "test")
                state["phase"] = "selected"
            return restore(checkpoint)

        setattr(owner, name, recording_evaluate)
        Checkpoint.restore = restore_after_final_test
        try:
            run(opts=list(argv))
        finally:
            setattr(owner, name, evaluate)
            Checkpoint.restore = restore
        trainer, config = state["trainer"], registry.get("config")
        self._trainer = trainer     # holds the selected checkpoint (MMF restored it for its test run)
        vals = [e for e in evals if e["split"] == "val" and e["phase"] == "training"]
        if trainer is None or not vals:
            raise RuntimeError(f"MMF ran no validation through {owner.__name__}.{name}, which compare records "
                               f"(training.trainer={config.training.get('trainer')}; MMF main's lightning trainer "
                               f"evaluates through Lightning): nothing to select or report")
        tests = {phase: [e["metrics"] for e in evals if e["split"] == "test" and e["phase"] == phase]
                 for phase in ("final", "selected")}
        stop = config.training.early_stop
        best = _early_stopping(trainer).best_monitored_update
        at_best = [e for e in vals if e["update"] == best]
        selections = {
            "val": Selection(at_best[-1]["metrics"] if at_best else None, (tests["selected"] or [None])[-1],
                             at=f"update {best}", criterion=f"MMF's best checkpoint: {'min' if stop.minimize else 'max'}"
                                                            f" of val/{stop.criteria}, restored before its test run"),
            "final": Selection(vals[-1]["metrics"], (tests["final"] or [None])[-1], at=f"update {vals[-1]['update']}",
                               criterion="the last update"),
        }
        return RunOutcome(selections, [], {"updates": vals[-1]["update"], "evaluations": len(vals)})


    def robustness_evaluator(self):
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            raise RuntimeError("robustness_evaluator: no trained run in this process (call train first)")
        return _Evaluator(trainer)


class _Evaluator:
    """The robustness evaluation (deqfusion_core.compare.robustness) of a trained MMF run: MMF's own evaluation
    of the test loader, the perturbation applied by ``FusionClassifier.input_transform`` to what each encoder
    reads; the noise scale from the first ``TRAIN_BATCHES`` batches of MMF's training loader."""

    TRAIN_BATCHES = 100
    noise_on = ("each modality's encoder input, the batch field it reads (easy-VQA: the image's pixels in [0, 1] "
                "and the question's bag of words), before the encoder")

    def __init__(self, trainer):
        from .fusion import DEQFusionMMF

        self.trainer = trainer
        self.model = getattr(trainer.model, "module", trainer.model)
        self.modalities = list(self.model.modalities)
        self.takes_mask = isinstance(self.model.fusion, DEQFusionMMF)

    def train_inputs(self):
        import torch

        from .missing import modality_mask

        for k, batch in enumerate(self.trainer.train_loader):
            if k >= self.TRAIN_BATCHES:
                break
            sample_list = self.trainer.dataset_loader.prepare_batch(batch)
            inputs = [self.model._input(m, sample_list) for m in self.modalities]
            if not all(isinstance(x, torch.Tensor) for x in inputs):
                raise ValueError("--robustness: an encoder reads the whole sample list (bert); noise on its input "
                                 "is not defined")
            yield inputs, modality_mask(sample_list, self.modalities, inputs[0].shape[0])

    def evaluate(self, transform):
        self.model.input_transform = transform
        try:
            _, meter = _evaluate(self.trainer, "test")
        finally:
            self.model.input_transform = None
        return _metrics(meter, "test")


# MMF main renamed rc10's trainer API the comparison uses (no version has both): these use whichever MMF has.
def _evaluation_hook():
    """``(class, method name, split of (trainer, its argument))`` of MMF's evaluation of one split, which returns
    ``(report, meter)``: rc10's ``BaseTrainer.evaluate(loader)`` or main's ``evaluation_loop(dataset_type)``."""
    from mmf.trainers.base_trainer import BaseTrainer

    if hasattr(BaseTrainer, "evaluate"):
        return BaseTrainer, "evaluate", \
            lambda trainer, loader: "val" if loader is getattr(trainer, "val_loader", None) else "test"
    from mmf.trainers.core.evaluation_loop import TrainerEvaluationLoopMixin

    return TrainerEvaluationLoopMixin, "evaluation_loop", lambda trainer, dataset_type: dataset_type


def _evaluate(trainer, split: str):
    """MMF's own evaluation of ``split`` (``val`` or ``test``) by ``trainer``: ``(report, meter)``."""
    if hasattr(trainer, "evaluate"):
        return trainer.evaluate(getattr(trainer, f"{split}_loader"))
    return trainer.evaluation_loop(split)


def _early_stopping(trainer):
    """The trainer's ``mmf.utils.early_stopping.EarlyStopping`` (rc10: ``trainer.early_stopping``; main: its
    ``early_stop_callback``'s)."""
    if hasattr(trainer, "early_stopping"):
        return trainer.early_stopping
    return trainer.early_stop_callback.early_stopping


def _metrics(meter, split: str) -> dict[str, float]:
    """``{metric: value}`` of one evaluation from MMF's meter (``<split>/<dataset>/<metric>``; losses left out)."""
    from mmf.common.registry import registry

    names = {m if isinstance(m, str) else m.get("type") for m in registry.get("config").evaluation.metrics}
    out = {}
    for key, value in meter.meters.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == split and parts[2] in names:
            out[parts[2]] = float(value.global_avg)
    return out
