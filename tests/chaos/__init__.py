"""The randomized fault campaign (issue #12): topology, workload, nemesis, checkers, report."""
