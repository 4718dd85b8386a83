"""bot inbox: updates stored before they are confirmed to the Bot API

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0003'
down_revision: Union[str, None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('bot_inbox',
    sa.Column('update_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('payload_enc', sa.LargeBinary(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.String(length=200), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('handled_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('update_id', name=op.f('pk_bot_inbox'))
    )
    with op.batch_alter_table('bot_inbox', schema=None) as batch_op:
        batch_op.create_index('ix_bot_inbox_status', ['status', 'update_id'], unique=False)
    # the inbox replaces the old record of processed update ids
    op.execute("DELETE FROM kv WHERE namespace = 'bot_update'")


def downgrade() -> None:
    with op.batch_alter_table('bot_inbox', schema=None) as batch_op:
        batch_op.drop_index('ix_bot_inbox_status')
    op.drop_table('bot_inbox')
