"""cases and case messages remember the patient's Telegram message they came from, so a replayed update
(a bot killed after its commit) opens no second case and adds no second note or question

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0008'
down_revision: Union[str, None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.add_column(sa.Column('opening_message_id', sa.BigInteger(), nullable=True))
        batch_op.create_unique_constraint(batch_op.f('uq_cases_patient_id_opening_message_id'),
                                          ['patient_id', 'opening_message_id'])
    with op.batch_alter_table('case_messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('telegram_message_id', sa.BigInteger(), nullable=True))
        batch_op.create_unique_constraint(batch_op.f('uq_case_messages_patient_id_role_telegram_message_id'),
                                          ['patient_id', 'role', 'telegram_message_id'])


def downgrade() -> None:
    with op.batch_alter_table('case_messages', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_case_messages_patient_id_role_telegram_message_id'), type_='unique')
        batch_op.drop_column('telegram_message_id')
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_cases_patient_id_opening_message_id'), type_='unique')
        batch_op.drop_column('opening_message_id')
