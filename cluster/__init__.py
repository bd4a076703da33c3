"""Where clusters are made: the node commands both cluster files run (the shell scripts
beside this file: node_setup.sh, head_setup.sh, start_head.sh, start_worker.sh, their
settings in settings.sh, and aws/ for the instance roles), and the clusters this machine
can bring up to try them: `python -m cluster.local` (a static or autoscaling Ray cluster
of processes with PostgreSQL and an MLflow server) and `python -m cluster.onprem_loopback`
(ray_cluster_onprem.yaml through `ray up` over SSH on loopback addresses). The study
platform (study/) knows nothing of this package.
"""
