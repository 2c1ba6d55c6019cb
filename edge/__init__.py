"""Edge agent: runs the head of a split model with its exits and offloads the rest.

Filled by the edge-cloud runtime issue (agent, transports, discovery browser, spool).
"""
