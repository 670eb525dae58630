"""Tag and metric names, as constants.

Used by the writers (the stages) and the readers (run lookups, lineage, :func:`crema.tracking.sweeps.sweep_runs`
behind ``crema compare``) alike, so a rename cannot silently break one side.
"""

# Tags
TAG_KIND = "crema.kind"  # KIND_SWEEP on a sweep's parent run, KIND_TRIAL on its children
KIND_SWEEP = "sweep"
KIND_TRIAL = "trial"
KIND_PRETRAIN_SWEEP = "pretrain_sweep"  # on a pretraining sweep's parent run; its trials are pretraining runs
KIND_DRIFT = "drift"  # on a `crema drift` run: one source against a reference in an encoder's embedding space
TAG_ENCODER_PATH = "encoder_path"  # on a pretraining run: the encoder artifact it wrote
TAG_ENCODER_ARTIFACT = "encoder_artifact"  # on a downstream run: the artifact it evaluated
TAG_ENCODER_RUN_ID = "encoder_run_id"  # on a downstream run: the pretraining run of its encoder
TAG_TASK = "task"
TAG_DATASET_VERSION = "dataset_version"  # the Iceberg snapshot id of the dataset's windows table
# MLflow's experiment type (read by its UI to pick the page an experiment opens on): crema trains models.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"
TAG_METHOD = "method"
TAG_ENCODER = "encoder"
TAG_ENCODER_INIT = "encoder_init"
TAG_LABEL_FRACTION = "label_fraction"
TAG_LABEL_DRAW = "label_draw"  # the seed of a label fraction's patient draw ("" at fraction 1: all patients)
TAG_LEAD_SET = "lead_set"  # the leads a downstream model saw: all, limb6, I, ... (crema.evaluation.lead_sets)
TAG_TRAIN_SOURCES = "train_sources"
TAG_TEST_SOURCES = "test_sources"
TAG_TRIAL_ID = "ray_trial_id"
TAG_BEST_TRIAL = "best_trial"
TAG_STOPPED_EARLY = "stopped_early"
TAG_REPLACES_RUN = "crema.replaces_run"  # on a run that restarted a job from scratch: the earlier run of its name
TAG_PARENT_RUN_ID = "mlflow.parentRunId"
# Metrics
METRIC_VAL_AUROC = "val_macro_auroc"  # what trials are compared on
METRIC_BEST_VAL_AUROC = "best_val_macro_auroc"
METRIC_EPOCH = "epoch"
METRIC_RESUMED_FROM_STEP = "resumed_from_step"
TEST_METRIC_PREFIX = "test_"
# What identifies a sweep in the comparison table: the latest finished sweep of each is reported. The
# pretraining run of the encoder is part of it: two runs' encoders under one name are two rows.
SWEEP_GROUP = [TAG_TASK, TAG_TRAIN_SOURCES, TAG_TEST_SOURCES, TAG_LEAD_SET, TAG_LABEL_FRACTION, TAG_LABEL_DRAW,
               TAG_METHOD, TAG_ENCODER, TAG_ENCODER_RUN_ID]
PRETRAIN_RUN = "pretrain_run"  # sweep_runs' column: the name of the encoder's pretraining run ("" for none)
SWEEP_FILTER = f"tags.`{TAG_KIND}` = '{KIND_SWEEP}' and attributes.status = 'FINISHED'"
