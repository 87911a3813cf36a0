"""Names of the record keys both sides of a Flower message agree on."""

ARRAYS = "arrays"          # ArrayRecord: model weights (global in, local out)
CONFIG = "config"          # ConfigRecord: the run's training config, kebab-case keys
METRICS = "metrics"        # MetricRecord: num-examples, train-loss, privacy numbers
PRIVACY = "privacy"        # ConfigRecord: client id, accountant, decline reason

NUM_EXAMPLES = "num-examples"
DECLINED = "declined"
UNIT_WEIGHT = "unit-weight"  # 1 per client: central DP averages updates with equal weights (sensitivity C/m)
SECAGG_CLIPPED = "secagg-clipped"  # values SecAgg+'s quantiser clipped in this reply (client/secagg_guard.py)
