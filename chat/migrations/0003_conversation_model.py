from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('chat', '0002_fleet'),
    ]

    operations = [
        migrations.AddField(
            model_name='conversation',
            name='model_name',
            field=models.CharField(blank=True, default='', max_length=200),
        ),
    ]
