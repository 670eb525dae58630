"""Everything MLflow: where to log, which run, what to tag it with, and reading the runs back.

The only package that imports MLflow, one job per module; every name below is re-exported here, so callers
use ``crema.tracking.<name>``:

- :mod:`~crema.tracking.names`: the tag and metric names, as constants, used by the writers (the stages) and
  the readers (run lookups, lineage, :func:`sweep_runs` behind ``crema compare``) alike, so a rename cannot
  silently break one side.
- :mod:`~crema.tracking.server`: where to log: the tracking URI, credentials, whether the server answers,
  the experiment and its page in the MLflow UI.
- :mod:`~crema.tracking.runs`: one run's life: params, finding, starting or resuming it (a re-run job
  continues the run of its name), its dataset input, figures, metrics; opening and closing a pretraining run.
- :mod:`~crema.tracking.models`: the encoder and the classifier logged as pyfunc models, and lineage: the
  pretraining run that wrote an encoder.
- :mod:`~crema.tracking.sweeps`: a sweep's parent run and its nested trial runs, and reading finished
  sweeps back.
- :mod:`~crema.tracking.results`: a test evaluation, a cross-domain table, a drift measurement.
- ``encoder_model``, ``classifier_model``: the pyfunc models, logged as code (no pickle).
"""

from crema.tracking.names import (TAG_KIND, KIND_SWEEP, KIND_TRIAL, KIND_PRETRAIN_SWEEP, KIND_DRIFT, TAG_ENCODER_PATH,
                                  TAG_ENCODER_ARTIFACT, TAG_ENCODER_RUN_ID, TAG_TASK, TAG_DATASET_VERSION,
                                  TAG_EXPERIMENT_KIND, EXPERIMENT_KIND_TRAINING, TAG_METHOD, TAG_ENCODER,
                                  TAG_ENCODER_INIT, TAG_LABEL_FRACTION, TAG_LABEL_DRAW, TAG_LEAD_SET, TAG_TRAIN_SOURCES,
                                  TAG_TEST_SOURCES, TAG_TRIAL_ID, TAG_BEST_TRIAL, TAG_STOPPED_EARLY, TAG_REPLACES_RUN,
                                  TAG_PARENT_RUN_ID, METRIC_VAL_AUROC, METRIC_BEST_VAL_AUROC, METRIC_EPOCH,
                                  METRIC_RESUMED_FROM_STEP, TEST_METRIC_PREFIX, SWEEP_GROUP, PRETRAIN_RUN,
                                  SWEEP_FILTER)
from crema.tracking.server import (TrackingUnavailable, check_reachable, CREDENTIALS_FILE_ENV,
                                   apply_credentials_file, resolve_tracking_uri, default_artifact_location,
                                   ensure_experiment, experiment_page, browse_hint)
from crema.tracking.runs import (SECRET_KEYS, redact, flatten_params, find_run, start_or_resume_run, log_new_params,
                                 dataset_tags, dataset_display_name, log_dataset_input, check_run_params, log_figure,
                                 flush, log_metrics, log_metric, open_training_run, close_training_run)
from crema.tracking.models import (PYFUNC_MODELS, log_encoder_model, log_classifier, encoder_run_id,
                                   encoder_provenance)
from crema.tracking.sweeps import (sweep_run, pretrain_sweep_run, log_sweep_table, log_run_metric, record_best_trial,
                                   nested_run_tags, start_trial_run, end_trial_run, close_trial_runs, sweep_runs)
from crema.tracking.results import log_test_evaluation, log_cross_domain, log_drift_run

__all__ = ["TAG_KIND", "KIND_SWEEP", "KIND_TRIAL", "KIND_PRETRAIN_SWEEP", "KIND_DRIFT", "TAG_ENCODER_PATH",
           "TAG_ENCODER_ARTIFACT", "TAG_ENCODER_RUN_ID", "TAG_TASK", "TAG_DATASET_VERSION", "TAG_EXPERIMENT_KIND",
           "EXPERIMENT_KIND_TRAINING", "TAG_METHOD", "TAG_ENCODER", "TAG_ENCODER_INIT", "TAG_LABEL_FRACTION", "TAG_LABEL_DRAW",
           "TAG_LEAD_SET", "TAG_TRAIN_SOURCES", "TAG_TEST_SOURCES", "TAG_TRIAL_ID", "TAG_BEST_TRIAL",
           "TAG_STOPPED_EARLY", "TAG_REPLACES_RUN", "TAG_PARENT_RUN_ID", "METRIC_VAL_AUROC", "METRIC_BEST_VAL_AUROC",
           "METRIC_EPOCH", "METRIC_RESUMED_FROM_STEP", "TEST_METRIC_PREFIX", "SWEEP_GROUP", "PRETRAIN_RUN",
           "SWEEP_FILTER", "TrackingUnavailable", "check_reachable", "CREDENTIALS_FILE_ENV",
           "apply_credentials_file", "resolve_tracking_uri", "default_artifact_location", "ensure_experiment",
           "experiment_page", "browse_hint", "SECRET_KEYS", "redact", "flatten_params", "find_run",
           "start_or_resume_run", "log_new_params", "dataset_tags", "dataset_display_name", "log_dataset_input",
           "check_run_params", "log_figure", "flush", "log_metrics", "log_metric", "open_training_run",
           "close_training_run", "PYFUNC_MODELS", "log_encoder_model", "log_classifier", "encoder_run_id",
           "encoder_provenance", "sweep_run", "pretrain_sweep_run", "log_sweep_table", "log_run_metric",
           "record_best_trial", "nested_run_tags", "start_trial_run", "end_trial_run", "close_trial_runs",
           "sweep_runs", "log_test_evaluation", "log_cross_domain", "log_drift_run"]
