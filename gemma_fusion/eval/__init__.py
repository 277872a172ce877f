"""Evaluation: teacher-forced loss and greedy-generation metrics per task."""
