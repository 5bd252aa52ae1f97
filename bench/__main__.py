"""`make bench`: one JSON object per line per figure; exits 0 even when a target is missed."""

from bench import engine

engine.main()
