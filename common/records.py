"""Names of the record keys both sides of a Flower message agree on."""

ARRAYS = "arrays"          # ArrayRecord: model weights (global in, local out)
CONFIG = "config"          # ConfigRecord: the run's training config, kebab-case keys
METRICS = "metrics"        # MetricRecord: num-examples, train-loss, privacy numbers
PRIVACY = "privacy"        # ConfigRecord: client id, accountant, decline reason

NUM_EXAMPLES = "num-examples"  # the client's own count; the server weighs by it only within its own range
DECLINED = "declined"
UNIT_WEIGHT = "unit-weight"  # central DP's equal weights (sensitivity C/m); the server sets 1 itself, whatever a reply says
SECAGG_CLIPPED = "secagg-clipped"  # values SecAgg+'s quantiser clipped in this reply (client/secagg_guard.py)
RUN_CLASSES = "run-num-classes"          # in CONFIG: the global model's classes (0 for the autoencoder)
RUN_INPUT_SHAPE = "run-input-shape"      # in CONFIG: the global model's input shape, channels first
