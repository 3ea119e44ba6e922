"""The lab: one file per item holding both its run and its report section (c1_training ... q_facts, and
scaling/ for the multi-GPU follow-up), the item registry, the context items run in, the driver that
runs a suite into a lab folder, and the report built from that folder's results.json."""
