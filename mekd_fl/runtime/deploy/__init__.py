"""Flower's Deployment Engine on one machine (`mekd-fl deploy-local`): TLS, authenticated SuperNodes, one run.

`local.deploy_local` is the command; `processes` starts, supervises and stops what it runs; `make_certs.sh`
makes the CA and the SuperLink's certificate (also usable on its own for real hosts, see docs/deployment.md's
"Beyond one machine").
"""
