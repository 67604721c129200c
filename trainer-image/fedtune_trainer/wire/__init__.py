"""The Job's wire format: the contract between the operator and every trainer Job.

Names both sides agree on (`contract`), the settings a run is made of (`settings`), the task a Job
is handed (`task`), where each artifact lives in storage (`layout`), what a Job reports back
(`results`) and the errors whose exit code says "no retry can fix this" (`errors`). Pydantic only:
the operator image installs this package and nothing else of the trainer (the import contracts
`job-contract` and `operator-wire-only` check both).
"""
