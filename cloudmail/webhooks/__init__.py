"""Framework-free webhook helpers: authenticate a request, then normalise its payload.

``signing`` implements Standard Webhooks for reports and the Worker's ``/enqueue``;
``sns`` verifies Amazon SNS HTTP(S) deliveries; ``ses_events`` turns the SES payload an
SNS notification carries into :class:`~cloudmail.webhooks.ses_events.SesEvent` objects.
None of them imports Flask or touches the database.
"""
