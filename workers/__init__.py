"""The frontend and expert workers, and the math they run (the math itself has no Ray in it)."""
