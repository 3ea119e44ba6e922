"""The report toolkit: document blocks, the markdown and HTML writers, plot helpers. It knows no lab
item by name: the lab (cifarlab.lab) builds the blocks and calls `write_report`."""
