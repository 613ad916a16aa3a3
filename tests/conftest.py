"""Make river.py and data_prep.py importable from a plain checkout (no install needed)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
