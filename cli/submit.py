"""spark-submit's entry point: the `recstream` command, e.g. `train`, with the master spark-submit gives.

    spark-submit --master spark://127.0.0.1:7077 cli/submit.py train --dataset shop

The job is the same code `recstream train` runs; `batch.spark.session` leaves the master and the
driver's memory to spark-submit (cli/spark_cluster.py builds the whole command line).
"""
import sys
from pathlib import Path

# spark-submit runs this file as a script, so its folder (cli/) comes first on sys.path, where
# main.py, services.py, evaluate.py ... would shadow modules of the same names: put the
# repository root there instead (the project is importable from it, installed or not).
HERE = Path(__file__).resolve().parent
if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == HERE:
    sys.path[0] = str(HERE.parent)

from cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
