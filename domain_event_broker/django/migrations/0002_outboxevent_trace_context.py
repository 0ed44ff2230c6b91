# Adds the trace context column (domain-event-broker 4.1).

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("domain_event_broker_django", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="outboxevent",
            name="trace_context",
            field=models.TextField(blank=True, default=""),
        ),
    ]
