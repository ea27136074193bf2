"""GPU memory: the byte meter, the planner (predictions from the file header), and the reproduction
experiment that measures one against the other."""
