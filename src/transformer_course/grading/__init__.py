"""The instructor's side: release exercises, run notebooks, grade batches with nbgrader."""
