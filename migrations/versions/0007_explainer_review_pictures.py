"""explainer review pictures: the sign-off samples, drawn by a gpu worker and kept by subject digest

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0007'
down_revision: Union[str, None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('explainer_review_pictures',
    sa.Column('subject_digest', sa.String(length=64), nullable=False),
    sa.Column('condition_code', sa.String(length=64), nullable=False),
    sa.Column('position', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('png', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('subject_digest', 'condition_code', 'position', name=op.f('pk_explainer_review_pictures'))
    )


def downgrade() -> None:
    op.drop_table('explainer_review_pictures')
