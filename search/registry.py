"""Register a run's model and decide champion or challenger (`model_registry.registration`).

    python search/registry.py --sweep-run-id PARENT_RUN_ID   # the sweep's best trial
    python search/registry.py --run-id RUN_ID [--name pneumonia-cnn] [--metric roc_auc]
"""

import sys

from search.model_registry.registration import main

if __name__ == "__main__":
    sys.exit(main())
